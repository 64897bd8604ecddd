"""Policy and value losses for GRPO / PPO-style training.

Per token, with `rho_t = exp(logp_t - old_t)` and advantage `A_t` (Schulman et al.
2017; asymmetric clip from DAPO, Yu et al. 2025; dual clip from Ye et al. 2020):

    l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high))
    l_t = min(l_t, -A_t * c)                   if A_t < 0 and dual_clip = c > 1
    L_t = l_t + kl_beta * kl_t - entropy_coef * H_t

`kl_t` is a `kl.kl_penalty` estimate against the reference policy. The per-token
loss is reduced to a scalar by one of `AGG_MODES` (see `aggregate_loss`).

Data-parallel rule. A learner with K ranks (and M gradient-accumulation
micro-batches each) averages the K*M micro-batch losses (DeepSpeed averages
gradients over ranks and scales each micro-batch loss by 1/M). Each mode divides
a sum over its micro-batch by a `normalizer`; the average equals the loss of the
whole batch exactly when every micro-batch uses

    normalizer = (global count of the mode's unit) / (K * M)

- `"token_mean"`: unit = valid token. Token counts differ between micro-batches,
  so a learner must all-reduce the token count and pass the normalizer; the
  local default (this micro-batch's count) is only right for one micro-batch.
- `"seq_mean_token_mean"`, `"seq_mean_token_sum_norm"`: unit = sequence. With
  equal-sized micro-batches the default (local B) is already exact; pass the
  normalizer when micro-batches have different numbers of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repic_ray.rl.kl import kl_penalty
from repic_ray.rl.masked import (
    check_right_padded,
    check_same_shape,
    masked_fill_zero,
    masked_mean,
    masked_sum,
)

__all__ = [
    "AGG_MODES",
    "aggregate_loss",
    "entropy_from_logits",
    "policy_loss",
    "ppo_clip_loss",
    "value_loss",
]

AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")

# exp(20) ~ 5e8: far beyond any clip range, and keeps rho finite in fp32/bf16.
_MAX_LOG_RATIO = 20.0


def aggregate_loss(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    agg: str = "seq_mean_token_mean",
    *,
    max_len: int | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    - `"seq_mean_token_mean"` (RePIC / GRPO): `sum_b (sum_t m L / sum_t m) / N`,
      default `N = B`; a row with no token contributes 0 but still counts in B.
    - `"token_mean"` (DAPO): `sum_bt m L / N`, default `N = sum_bt m`.
    - `"seq_mean_token_sum_norm"` (Dr.GRPO): `sum_b (sum_t m L / max_len) / N`,
      default `N = B`; `max_len` (the generation limit, a constant) is required.
      Padding the batch to a different T does not change the loss.

    `normalizer` replaces the default `N`; see the module docstring for the value a
    data-parallel learner must pass.
    """
    check_same_shape(loss_BT, mask_BT, "loss_BT", "mask_BT")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if agg == "token_mean":
        n = mask_BT.to(loss_BT.dtype).sum().clamp(min=1) if normalizer is None else normalizer
        return masked_sum(loss_BT, mask_BT) / n
    n = loss_BT.shape[0] if normalizer is None else normalizer
    if agg == "seq_mean_token_mean":
        seq_B = masked_mean(loss_BT, mask_BT, dim=1)
    elif agg == "seq_mean_token_sum_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(
                f"agg='seq_mean_token_sum_norm' needs max_len > 0 (the generation "
                f"limit), got {max_len}"
            )
        seq_B = masked_sum(loss_BT, mask_BT, dim=1) / max_len
    else:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    return seq_B.sum() / n


def ppo_clip_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate `l_t` (module docstring), shape `[B, T]`.

    Gradient flows through `logprobs_BT` only: old log-probs and advantages are
    detached. Padding gets loss 0 and no gradient, whatever values it holds.
    Returns `(loss_BT, info)` where `info` holds detached per-token tensors:
    `ratio` (rho), `clipped` (the clip branch is active, so no gradient),
    `dual_clipped` (the dual-clip bound is active, no gradient).
    """
    check_same_shape(logprobs_BT, mask_BT, "logprobs_BT", "mask_BT")
    check_same_shape(old_logprobs_BT, mask_BT, "old_logprobs_BT", "mask_BT")
    check_same_shape(advantages_BT, mask_BT, "advantages_BT", "mask_BT")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    valid = mask_BT.bool()
    # Zero the padding first so that garbage there (-inf log-probs) cannot turn
    # into NaN gradients through exp().
    logp = masked_fill_zero(logprobs_BT, mask_BT)
    old = masked_fill_zero(old_logprobs_BT.detach(), mask_BT)
    adv = masked_fill_zero(advantages_BT.detach(), mask_BT)

    log_ratio = (logp - old).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_mask = (clipped > unclipped) & valid
    dual_mask = torch.zeros_like(valid)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_mask = (adv < 0) & (loss > bound) & valid
        loss = torch.where(dual_mask, bound, loss)
    loss = masked_fill_zero(loss, mask_BT)
    info = {
        "ratio": ratio.detach(),
        "log_ratio": log_ratio.detach(),
        "clipped": clipped_mask,
        "dual_clipped": dual_mask,
    }
    return loss, info


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis: `H = logsumexp(z) - sum_v p_v z_v`.

    Shape `[..., V] -> [...]`, e.g. `entropy_BT`. Logits of `-inf` (banned tokens)
    are allowed: their `p * z` term is taken as 0. Differentiable.
    """
    logz = torch.logsumexp(logits_BTV, dim=-1)
    p = torch.softmax(logits_BTV, dim=-1)
    # Zero the logits where p == 0 before the product: `0 * -inf` would give NaN in
    # the forward pass and (through where's backward) in the gradient.
    z = torch.where(p > 0, logits_BTV, torch.zeros((), dtype=p.dtype, device=p.device))
    return logz - (p * z).sum(dim=-1)


@dataclass(frozen=True)
class LossSettings:
    """The scalar settings of `policy_loss` (a learner builds one from its loss config)."""

    clip_low: float = 0.2
    """PPO clip below: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip above: the ratio is clipped at 1 + clip_high (DAPO: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages; None = off."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference in the loss."""
    kl_estimator: str = "k3"
    """k1, k2 or k3."""
    kl_clamp: float | None = None
    """Clamp of the per-token KL estimate; None = unclamped."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (loss -= entropy_coef * entropy)."""
    agg: str = "seq_mean_token_mean"
    """Loss aggregation mode (`AGG_MODES`)."""
    max_len: int | None = None
    """Generation budget of `seq_mean_token_sum_norm`."""


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    ref_logprobs_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full policy loss `agg(l_t + kl_beta * kl_t - entropy_coef * H_t)`.

    Tensors are `[B, T]` with a right-padded `mask_BT`; the scalars are `settings`
    (`LossSettings`). `ref_logprobs_BT` is needed when `kl_beta != 0` (the KL is
    reported whenever it is given);
    `entropy_BT` (from `entropy_from_logits`, with gradient) when
    `entropy_coef != 0`. RePIC: `clip_low = clip_high = 0.2`, `kl_beta = 0.04`,
    k3, `"seq_mean_token_mean"`. DAPO: `clip_high = 0.28`, `"token_mean"`.
    Dr.GRPO: `"seq_mean_token_sum_norm"` with `max_len`.

    Returns `(loss, stats)`; `stats` are detached 0-d tensors: `pg_loss`
    (aggregated like the loss), and token means over this micro-batch of `kl`,
    `entropy`, `clip_frac`, `dual_clip_frac`, `ratio_mean`, `approx_kl`
    (`rho - 1 - log rho`, an estimate of KL(old || new)).
    """
    check_right_padded(mask_BT, allow_empty=True)
    if settings.kl_beta != 0.0 and ref_logprobs_BT is None:
        raise ValueError(f"kl_beta={settings.kl_beta} needs ref_logprobs_BT")
    if settings.entropy_coef != 0.0 and entropy_BT is None:
        raise ValueError(f"entropy_coef={settings.entropy_coef} needs entropy_BT")

    pg_BT, info = ppo_clip_loss(
        logprobs_BT,
        old_logprobs_BT,
        advantages_BT,
        mask_BT,
        clip_low=settings.clip_low,
        clip_high=settings.clip_high,
        dual_clip=settings.dual_clip,
    )
    total_BT = pg_BT
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs_BT is not None:
        check_same_shape(ref_logprobs_BT, mask_BT, "ref_logprobs_BT", "mask_BT")
        kl_BT = kl_penalty(
            masked_fill_zero(logprobs_BT, mask_BT),
            masked_fill_zero(ref_logprobs_BT.detach(), mask_BT),
            settings.kl_estimator,
            settings.kl_clamp,
        )
        if settings.kl_beta != 0.0:
            total_BT = total_BT + settings.kl_beta * kl_BT
        stats["kl"] = masked_mean(kl_BT.detach(), mask_BT)
    if entropy_BT is not None:
        check_same_shape(entropy_BT, mask_BT, "entropy_BT", "mask_BT")
        ent_BT = masked_fill_zero(entropy_BT, mask_BT)
        if settings.entropy_coef != 0.0:
            total_BT = total_BT - settings.entropy_coef * ent_BT
        stats["entropy"] = masked_mean(ent_BT.detach(), mask_BT)

    def reduce(x_BT: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x_BT, mask_BT, settings.agg, max_len=settings.max_len, normalizer=normalizer)

    loss = reduce(total_BT)
    ratio, log_ratio = info["ratio"], info["log_ratio"]
    stats.update(
        pg_loss=reduce(pg_BT.detach()),
        clip_frac=masked_mean(info["clipped"].to(ratio.dtype), mask_BT),
        dual_clip_frac=masked_mean(info["dual_clipped"].to(ratio.dtype), mask_BT),
        ratio_mean=masked_mean(ratio, mask_BT),
        approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask_BT),
    )
    return loss, stats


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss (PPO2):

        V^clip_t = old_t + clip(V_t - old_t, -clip, clip)
        L_t      = 0.5 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)

    `clip=None` gives the plain `0.5 * (V_t - R_t)^2`. Gradient flows through
    `values_BT` only. Aggregated by `aggregate_loss` (same data-parallel rule).
    Returns `(loss, stats)` with detached `vf_clip_frac` (tokens whose gradient
    the clip removes) and `vf_explained_var` (`1 - Var(R - V) / Var(R)`).
    """
    check_same_shape(values_BT, mask_BT, "values_BT", "mask_BT")
    check_same_shape(old_values_BT, mask_BT, "old_values_BT", "mask_BT")
    check_same_shape(returns_BT, mask_BT, "returns_BT", "mask_BT")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    v = masked_fill_zero(values_BT, mask_BT)
    old = masked_fill_zero(old_values_BT.detach(), mask_BT)
    ret = masked_fill_zero(returns_BT.detach(), mask_BT)
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clipped_mask = torch.zeros_like(mask_BT, dtype=torch.bool)
    else:
        v_clip = old + (v - old).clamp(-clip, clip)
        clipped = (v_clip - ret) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_mask = (clipped > unclipped) & mask_BT.bool()
    loss = aggregate_loss(per_token, mask_BT, agg, max_len=max_len, normalizer=normalizer)
    var_ret = masked_mean((ret - masked_mean(ret, mask_BT)) ** 2, mask_BT)
    resid = (ret - v).detach()
    var_res = masked_mean((resid - masked_mean(resid, mask_BT)) ** 2, mask_BT)
    stats = {
        "vf_clip_frac": masked_mean(clipped_mask.to(v.dtype), mask_BT),
        "vf_explained_var": 1.0 - var_res / var_ret.clamp(min=1e-8),
    }
    return loss, stats
