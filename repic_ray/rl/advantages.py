"""Advantage estimators (masked statistics: `repic_ray.rl.masked`).

Outcome rewards arrive per sequence (`rewards_B`); sequences that share a prompt
share a group id in `index_B` (any integers, in any order). Token-level tensors
are `[B, T]` with a right-padded `mask_BT` (1 on completion tokens, then 0s):
row b has its real tokens at positions `0 .. len_b - 1`.

Estimators (A = advantage, r = reward, V = value):

- GRPO (Shao et al. 2024, RePIC): `A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`,
  `std` with Bessel's correction like `torch.std` (RePIC's trainer); eps 1e-4.
  `norm_by_std=False` gives Dr.GRPO (Liu et al. 2025): `A_i = r_i - mean_g(r)`.
- RLOO (Ahmadian et al. 2024): `A_i = r_i - mean_{j != i in g}(r_j)`.
- REINFORCE++ (Hu 2025): token rewards (outcome at the last token, minus
  `beta * kl_t` per token), discounted returns-to-go, whitened over the batch.
- GAE (Schulman et al. 2016): `delta_t = r_t + gamma V_{t+1} - V_t`,
  `A_t = sum_l (gamma lambda)^l delta_{t+l}`, returns `A_t + V_t`; the state after
  the last real token is terminal (`V = 0`).
"""

from __future__ import annotations

import torch

from repic_ray.rl.masked import (
    check_right_padded,
    check_same_shape,
    masked_fill_zero,
    masked_whiten,
)

__all__ = [
    "broadcast_to_tokens",
    "discounted_returns",
    "gae_advantages",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_level_rewards",
]


def broadcast_to_tokens(advantages_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sequence advantages to tokens: `advantages_BT[b, t] = advantages_B[b] * mask_BT[b, t]`."""
    if advantages_B.dim() != 1 or advantages_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(
            f"advantages_B shape {tuple(advantages_B.shape)} does not match "
            f"mask_BT shape {tuple(mask_BT.shape)}"
        )
    return advantages_B[:, None] * mask_BT.to(advantages_B.dtype)


def token_level_rewards(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Place each outcome reward on its sequence's last real token.

    `token_rewards_BT[b, len_b - 1] = rewards_B[b]`, 0 elsewhere. `mask_BT` must be
    right-padded with at least one token per row (`check_right_padded`).
    """
    len_B = check_right_padded(mask_BT)
    if rewards_B.dim() != 1 or rewards_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(
            f"rewards_B shape {tuple(rewards_B.shape)} does not match "
            f"mask_BT shape {tuple(mask_BT.shape)}"
        )
    out = torch.zeros(mask_BT.shape, dtype=rewards_B.dtype, device=rewards_B.device)
    rows = torch.arange(mask_BT.shape[0], device=mask_BT.device)
    out[rows, len_B - 1] = rewards_B
    return out


def discounted_returns(
    token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Returns-to-go `G_t = sum_{k >= t} gamma^(k-t) r_k` over each row's real tokens.

    Padding contributes nothing and gets 0; shape `[B, T]`.
    """
    check_same_shape(token_rewards_BT, mask_BT, "token_rewards_BT", "mask_BT")
    check_right_padded(mask_BT, allow_empty=True)
    valid = mask_BT.bool()
    r = torch.where(valid, token_rewards_BT, torch.zeros_like(token_rewards_BT))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(valid, out, torch.zeros_like(out))


# ---------------------------------------------------------------- group-based


def _group_stats(rewards_B: torch.Tensor, index_B: torch.Tensor):
    """Per-sequence group sum, group size, and the inverse map, vectorized."""
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards_B must be 1-D, got shape {tuple(rewards_B.shape)}")
    if index_B.shape != rewards_B.shape:
        raise ValueError(
            f"index_B shape {tuple(index_B.shape)} != rewards_B shape {tuple(rewards_B.shape)}"
        )
    if not torch.isfinite(rewards_B).all():
        bad = int((~torch.isfinite(rewards_B)).nonzero()[0])
        raise ValueError(f"rewards_B[{bad}] is not finite: {rewards_B[bad].item()}")
    _, inverse_B, count_U = torch.unique(index_B, return_inverse=True, return_counts=True)
    n_groups = count_U.shape[0]
    sum_U = torch.zeros(n_groups, dtype=rewards_B.dtype, device=rewards_B.device)
    sum_U.index_add_(0, inverse_B, rewards_B)
    return sum_U, count_U.to(rewards_B.dtype), inverse_B


def grpo_advantages(
    rewards_B: torch.Tensor,
    index_B: torch.Tensor,
    *,
    eps: float = 1e-4,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO outcome advantage per sequence, `advantages_B`.

    `A_i = (r_i - mean_g) / (std_g + eps)` over the group `g = index_B[i]`, std with
    Bessel's correction (`torch.std`, as RePIC); `norm_by_std=False` gives
    Dr.GRPO's `A_i = r_i - mean_g`. A group of one sequence has no baseline and
    gets advantage 0 (its std is taken as 0); a group whose rewards are all equal
    gets 0 as well. Broadcast to tokens with `broadcast_to_tokens`. Compute it on
    the whole batch before splitting it across learners: each group must be whole.
    """
    sum_U, count_U, inv_B = _group_stats(rewards_B, index_B)
    mean_U = sum_U / count_U
    centered_B = rewards_B - mean_U[inv_B]
    if not norm_by_std:
        return centered_B
    sq_U = torch.zeros_like(sum_U).index_add_(0, inv_B, centered_B**2)
    std_U = (sq_U / (count_U - 1).clamp(min=1)).sqrt()
    return centered_B / (std_U[inv_B] + eps)


def rloo_advantages(rewards_B: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    """RLOO advantage per sequence: `A_i = r_i - (sum_g - r_i) / (n_g - 1)`.

    Equivalently `n_g / (n_g - 1) * (r_i - mean_g)`. Every group needs at least two
    sequences; a singleton group raises `ValueError` naming its index.
    """
    sum_U, count_U, inv_B = _group_stats(rewards_B, index_B)
    if (count_U < 2).any():
        single = torch.unique(index_B)[count_U < 2]
        raise ValueError(
            f"rloo_advantages: groups {single.tolist()} of index_B have one sequence; "
            "the leave-one-out baseline needs at least two"
        )
    n_B = count_U[inv_B]
    return rewards_B - (sum_U[inv_B] - rewards_B) / (n_B - 1)


# ------------------------------------------------------------- token-based


def reinforce_pp_advantages(
    rewards_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_BT: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    gamma: float = 1.0,
    index_B: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ token advantages `advantages_BT` (OpenRLHF's `reinforce`).

    1. token rewards: `r_t = [t = len - 1] * R - kl_beta * kl_t` (`kl_BT` from
       `kl.kl_penalty`, detached: the penalty is a reward, not a gradient path);
    2. returns-to-go `G_t = sum_{k >= t} gamma^(k-t) r_k`;
    3. whitening over every valid token of the batch: `(G - mean) / (std + eps)`.

    With `index_B`, the group mean of `rewards_B` is subtracted first
    ("REINFORCE++-baseline"). Padding gets 0. Batch whitening makes the result
    depend on the whole batch: under data parallelism compute it once on the
    full batch before splitting.
    """
    if index_B is not None:
        rewards_B = grpo_advantages(rewards_B, index_B, norm_by_std=False)
    token_rewards_BT = token_level_rewards(rewards_B, mask_BT)
    if kl_BT is not None and kl_beta != 0.0:
        check_same_shape(kl_BT, mask_BT, "kl_BT", "mask_BT")
        token_rewards_BT = token_rewards_BT - kl_beta * masked_fill_zero(kl_BT.detach(), mask_BT)
    returns_BT = discounted_returns(token_rewards_BT, mask_BT, gamma)
    return masked_whiten(returns_BT, mask_BT, eps=eps)


def gae_advantages(
    token_rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation for PPO with a critic.

    `values_BT[b, t]` is the critic's V(s_t) before emitting token t;
    `token_rewards_BT` the per-token rewards (`token_level_rewards`, possibly with
    `kl.apply_kl_to_rewards`). The state after each row's last real token is
    terminal, so `V(s_len) = 0`:

        delta_t = r_t + gamma * V_{t+1} * [t + 1 < len] - V_t
        A_t     = delta_t + gamma * lam * A_{t+1} * [t + 1 < len]
        R_t     = A_t + V_t            (value targets, "returns")

    Values and rewards on padding are ignored (they may hold anything finite).
    Returns `(advantages_BT, returns_BT)`, both 0 on padding and detached from
    `values_BT`. Same targets as RLlib's `compute_value_targets` with
    `terminateds` set on each last token.
    """
    check_same_shape(token_rewards_BT, mask_BT, "token_rewards_BT", "mask_BT")
    check_same_shape(values_BT, mask_BT, "values_BT", "mask_BT")
    check_right_padded(mask_BT, allow_empty=True)
    valid = mask_BT.bool()
    values = torch.where(valid, values_BT.detach(), torch.zeros_like(values_BT))
    rewards = torch.where(valid, token_rewards_BT.detach(), torch.zeros_like(values))
    # With a right-padded mask, "next token is real" is just mask[:, t + 1]; past
    # the last token both V_{t+1} and A_{t+1} are cut off.
    T = mask_BT.shape[1]
    next_valid = torch.zeros_like(values)
    if T > 1:
        next_valid[:, :-1] = valid[:, 1:].to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * next_valid[:, t] - values[:, t]
        running = delta + gamma * lam * next_valid[:, t] * running
        advantages[:, t] = running
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns
