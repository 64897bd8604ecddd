"""Turning scored rollouts into a learner batch: advantages, masks, KL-in-reward.

Pure functions of tensors and a few scalars (the driver passes the estimator name
and its constants, not the experiment config).
"""

from __future__ import annotations

import numpy as np
import torch

from repic_ray.learner.batch import TrainBatch
from repic_ray.rewards.base import RewardOutput
from repic_ray.rl import advantages as adv
from repic_ray.rollout.types import Completion, RolloutRequest


def pad_right(rows: list[list[float]], width: int | None = None, value: float = 0.0) -> torch.Tensor:
    """Right-pad ragged rows into a float tensor of shape (len(rows), width)."""
    width = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row[:width], dtype=torch.float32)
    return out


def compute_advantages(
    estimator: str,
    rewards_B: torch.Tensor,
    index_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    std_eps: float = 1e-4,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_BT: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    values_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (and returns for `gae`) of B scored sequences.

    `index_B` holds each sequence's prompt (group) id. GRPO-family estimators score
    whole sequences and broadcast over the completion mask; `reinforce_pp` and `gae`
    work on token rewards (the sequence reward at the last real token), into which
    `kl_beta * kl_BT` is folded when given (KL-in-reward).

    Returns `(advantages_BT, returns_BT or None)`.
    """
    if estimator in ("grpo", "drgrpo"):
        a_B = adv.grpo_advantages(rewards_B, index_B, eps=std_eps, norm_by_std=estimator == "grpo")
        return adv.broadcast_to_tokens(a_B, mask_BT), None
    if estimator == "rloo":
        return adv.broadcast_to_tokens(adv.rloo_advantages(rewards_B, index_B), mask_BT), None
    if estimator == "reinforce_pp":
        a_BT = adv.reinforce_pp_advantages(
            rewards_B, mask_BT, kl_BT=kl_BT, kl_beta=kl_beta, gamma=gamma
        )
        return a_BT, None
    token_rewards_BT = adv.token_level_rewards(rewards_B, mask_BT)
    if kl_BT is not None and kl_beta > 0:
        token_rewards_BT = token_rewards_BT - kl_beta * kl_BT * mask_BT
    if estimator == "gae":
        if values_BT is None:
            raise ValueError("estimator 'gae' needs values_BT from the learner's critic")
        return adv.gae_advantages(token_rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def concat_reward_outputs(outputs: list[RewardOutput]) -> RewardOutput:
    """Join the reward actors' outputs (in chunk order) into one batch."""
    keys = set().union(*(o.components for o in outputs)) if outputs else set()
    missing = [k for k in keys if any(k not in o.components for o in outputs)]
    if missing:
        raise ValueError(f"reward actors disagree on components: {sorted(missing)}")
    return RewardOutput(
        rewards_B=np.concatenate([o.rewards_B for o in outputs]) if outputs else np.zeros(0),
        components={k: np.concatenate([o.components[k] for o in outputs]) for k in sorted(keys)},
    )


def rollout_batch(rows: list[tuple[RolloutRequest, Completion]]) -> TrainBatch:
    """A learner batch of sampled completions, one row per (request, completion).

    `old_logprobs_BT` are the rollout's; advantages start at zero (filled in by the caller).
    """
    return TrainBatch(
        prompt_texts=[r.prompt_text for r, _ in rows],
        image_paths=[list(r.image_paths) for r, _ in rows],
        completion_ids=[c.token_ids for _, c in rows],
        old_logprobs_BT=pad_right([c.logprobs for _, c in rows]),
        advantages_BT=torch.zeros(len(rows)),
    )
