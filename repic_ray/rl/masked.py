"""Masked statistics over right-padded token tensors: sum, mean, variance, whitening,
and the shape / padding checks every RL function runs on its inputs."""

from __future__ import annotations

import torch

__all__ = [
    "check_right_padded",
    "check_same_shape",
    "masked_fill_zero",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`sum(x * mask)` over `dim` (all elements if None); masked entries never leak.

    Uses `where` rather than a product so that NaN/inf in masked positions do not
    turn the sum into NaN.
    """
    check_same_shape(x, mask, "x", "mask")
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`sum(x * mask) / sum(mask)` over `dim`; a slice with no valid entry gives 0."""
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of `x` (all of them, one scalar).

    `unbiased=True` divides by `n - 1` (Bessel); raises `ValueError` when there are
    fewer valid entries than that needs.
    """
    n = mask.to(x.dtype).sum()
    need = 2 if unbiased else 1
    if n < need:
        raise ValueError(f"masked_var: mask has {int(n)} valid entries, need at least {need}")
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    return sq / (n - 1) if unbiased else sq / n


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """`(x - mean) / (std + eps)` with mean/std over the valid entries; 0 where masked.

    `shift_mean=False` only rescales (adds the mean back), as some PPO variants do.
    Std is the biased one (divide by n), so a single valid entry whitens to 0.
    """
    mean = masked_mean(x, mask)
    std = masked_var(x, mask, unbiased=False).sqrt()
    out = (x - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------- masks and tokens


def check_right_padded(mask_BT: torch.Tensor, *, allow_empty: bool = False) -> torch.Tensor:
    """Validate a right-padded mask and return the lengths `len_B` (int64).

    Each row must be `1 ... 1 0 ... 0` with values in {0, 1}; a row with no token
    raises unless `allow_empty`. Errors name the offending row.
    """
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be 2-D [B, T], got shape {tuple(mask_BT.shape)}")
    m = mask_BT.to(torch.int64)
    if ((m != 0) & (m != 1)).any():
        row = int(((m != 0) & (m != 1)).any(dim=1).nonzero()[0])
        raise ValueError(f"mask_BT row {row} has values other than 0/1")
    if m.shape[1] > 1:
        rises = (m[:, 1:] > m[:, :-1]).any(dim=1)
        if rises.any():
            row = int(rises.nonzero()[0])
            raise ValueError(
                f"mask_BT row {row} is not right-padded (a 0 is followed by a 1): {m[row].tolist()}"
            )
    len_B = m.sum(dim=1)
    if not allow_empty and (len_B == 0).any():
        row = int((len_B == 0).nonzero()[0])
        raise ValueError(f"mask_BT row {row} has no completion token")
    return len_B



def masked_fill_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` with masked-out entries set to 0 (NaN-safe, unlike `x * mask`)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")
