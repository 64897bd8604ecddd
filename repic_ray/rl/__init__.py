"""RL math: advantages, KL estimators and policy / value losses.

Every function here is a pure function of tensors and a few scalars; none takes a
config object. Shapes follow the package convention (`repic_ray/__init__.py`):
`rewards_B`, `index_B` (group id of each sequence), `logprobs_BT`, `mask_BT`
(right-padded completion mask), `advantages_BT`, `logits_BTV`.

- `masked`: masked sum / mean / variance / whitening and the input checks.
- `advantages`: GRPO / Dr.GRPO, RLOO, REINFORCE++, GAE.
- `kl`: the k1 / k2 / k3 estimators of KL(policy || reference), in the loss or
  folded into token rewards.
- `losses`: PPO clipped surrogate (asymmetric clip, dual clip), loss aggregation
  modes with their data-parallel rules, entropy, clipped value loss, and
  `policy_loss`, the one call a learner makes.
"""

from repic_ray.rl.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)
from repic_ray.rl.kl import KL_ESTIMATORS, apply_kl_to_rewards, kl_penalty
from repic_ray.rl.losses import (
    AGG_MODES,
    LossSettings,
    aggregate_loss,
    entropy_from_logits,
    policy_loss,
    ppo_clip_loss,
    value_loss,
)
from repic_ray.rl.masked import (
    check_right_padded,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "LossSettings",
    "aggregate_loss",
    "apply_kl_to_rewards",
    "broadcast_to_tokens",
    "check_right_padded",
    "discounted_returns",
    "entropy_from_logits",
    "gae_advantages",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_level_rewards",
    "value_loss",
]
