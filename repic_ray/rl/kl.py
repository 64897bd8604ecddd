"""Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman 2020).

With `d_t = logp_t - ref_t` for a token sampled from the policy pi:

    k1 = d                        unbiased, can be negative, high variance
    k2 = 0.5 * d**2               biased, low variance; its gradient is that of KL
    k3 = exp(-d) - (-d) - 1       unbiased and >= 0 (RePIC / GRPO's choice)

`E_{x ~ pi}[k1] = E[k3] = KL(pi || pi_ref)`. Use them inside the loss
(`losses.policy_loss(kl_beta=...)`, gradient through `logp` only) or fold them
into token rewards (`apply_kl_to_rewards`, no gradient).
"""

from __future__ import annotations

import torch

from repic_ray.rl.masked import check_same_shape, masked_fill_zero

__all__ = ["KL_ESTIMATORS", "apply_kl_to_rewards", "kl_penalty"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    estimator: str = "k3",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate `kl_BT` (see the module docstring for k1/k2/k3).

    The gradient flows through `logprobs_BT` only; `ref_logprobs_BT` is detached.
    `clamp` bounds the result to `[-clamp, clamp]` (k3 can explode when the policy
    drifts far from the reference; verl clamps at 10). Padding is not masked here:
    the caller aggregates with its mask.
    """
    check_same_shape(logprobs_BT, ref_logprobs_BT, "logprobs_BT", "ref_logprobs_BT")
    d = logprobs_BT - ref_logprobs_BT.detach()
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d**2
    elif estimator == "k3":
        # exp(-d) overflows to inf for d < -88 in fp32; clamp the exponent only, so
        # that ordinary values keep exact gradients.
        kl = torch.exp((-d).clamp(max=20.0)) + d - 1.0
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


def apply_kl_to_rewards(
    token_rewards_BT: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL folded into the reward: `r'_t = r_t - beta * kl_t` on real tokens.

    Returns `(token_rewards_BT, kl_BT)`; both are detached (a reward carries no
    gradient) and 0 on padding. k1 is the usual choice here (PPO-RLHF, REINFORCE++),
    since the return sums it over tokens into the sequence-level log-ratio.
    """
    check_same_shape(token_rewards_BT, mask_BT, "token_rewards_BT", "mask_BT")
    kl_BT = kl_penalty(logprobs_BT.detach(), ref_logprobs_BT, estimator, clamp)
    kl_BT = masked_fill_zero(kl_BT, mask_BT)
    rewards = masked_fill_zero(token_rewards_BT.detach(), mask_BT) - beta * kl_BT
    return rewards, kl_BT
