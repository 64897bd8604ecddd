"""Typed messages into and out of the learner.

A `TrainBatch` carries B (prompt, completion) sequences as the rollout produced
them: the chat-template-rendered prompt text (with the image placeholders), the
image files it refers to, the sampled completion token ids, and right-padded
per-token tensors of width T = the longest completion. The learner turns it into
model inputs itself (`build_inputs`), so what crosses the process boundary is
small and model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def _check_list(name: str, value: object, n: int) -> None:
    if not isinstance(value, list):
        raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} entries (one per sequence), got {len(value)}")


def _check_completions(completion_ids: list[list[int]]) -> None:
    for b, ids in enumerate(completion_ids):
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(
                f"completion_ids[{b}]: expected a non-empty list of token ids, got {ids!r}"
            )
        if not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"completion_ids[{b}]: token ids must be non-negative ints")


def completion_mask(completion_ids: list[list[int]], width: int | None = None) -> torch.Tensor:
    """mask_BT: 1.0 on real completion tokens, 0.0 on right padding."""
    lengths = torch.tensor([len(ids) for ids in completion_ids])
    width = int(lengths.max()) if width is None else width
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def _check_bt(
    name: str, value: torch.Tensor | None, B: int, T: int, *, allow_b: bool = False
) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if allow_b and value.shape == (B,):
        return
    if tuple(value.shape) != (B, T):
        want = f"({B}, {T})" + (f" or ({B},)" if allow_b else "")
        raise ValueError(f"{name}: expected shape {want}, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or inf")


@dataclass
class TrainBatch:
    """B sequences for an RL update (GRPO / PPO). Tensors are right-padded to
    T = max completion length; padded entries are ignored."""

    prompt_texts: list[str]
    """Chat-template-rendered prompt of each sequence, image placeholders included."""
    image_paths: list[list[str]]
    """Image files of each prompt, in placeholder order (may be empty)."""
    completion_ids: list[list[int]]
    """Sampled completion token ids of each sequence (no padding)."""
    old_logprobs_BT: torch.Tensor
    """Log-probs of the completion tokens under the behaviour policy."""
    advantages_BT: torch.Tensor
    """Per-token advantages, or `advantages_B` (shape (B,)) broadcast over tokens."""
    ref_logprobs_BT: torch.Tensor | None = None
    """Reference-policy log-probs; computed by the learner when None and kl_beta > 0."""
    returns_BT: torch.Tensor | None = None
    """Value targets (PPO with a critic)."""
    values_BT: torch.Tensor | None = None
    """Value predictions at rollout time (PPO value clipping)."""
    on_policy: bool = False
    """The rollouts were sampled from the weights the learner holds now, and this batch
    gets one optimizer step: the old log-probs are then the training forward's own
    (detached; ratio exactly 1), so no separate log-prob pass is needed, and
    `old_logprobs_BT` (the rollout's) serves only the learner-vs-rollout mismatch."""

    def __post_init__(self) -> None:
        B = len(self.prompt_texts)
        if B == 0:
            raise ValueError("TrainBatch: empty batch")
        _check_list("image_paths", self.image_paths, B)
        _check_list("completion_ids", self.completion_ids, B)
        _check_completions(self.completion_ids)
        T = max(len(ids) for ids in self.completion_ids)
        _check_bt("old_logprobs_BT", self.old_logprobs_BT, B, T)
        _check_bt("advantages_BT", self.advantages_BT, B, T, allow_b=True)
        _check_bt("ref_logprobs_BT", self.ref_logprobs_BT, B, T)
        _check_bt("returns_BT", self.returns_BT, B, T)
        _check_bt("values_BT", self.values_BT, B, T)
        if self.advantages_BT.dim() == 1:
            self.advantages_BT = self.advantages_BT[:, None].expand(B, T).contiguous()

    def __len__(self) -> int:
        return len(self.prompt_texts)

    @property
    def mask_BT(self) -> torch.Tensor:
        return completion_mask(self.completion_ids)

    def select(self, idx: list[int]) -> TrainBatch:
        """The sub-batch of rows `idx`, its tensors cut to the sub-batch's own T."""
        comp = [self.completion_ids[i] for i in idx]
        T = max(len(ids) for ids in comp)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx, :T]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx]
            else:
                out[f.name] = value
        return TrainBatch(**out)


@dataclass
class SFTBatch:
    """B (prompt, target) pairs for supervised fine-tuning with cross-entropy on the
    target tokens only."""

    prompt_texts: list[str]
    """Chat-template-rendered prompt of each sequence, image placeholders included."""
    image_paths: list[list[str]]
    """Image files of each prompt, in placeholder order (may be empty)."""
    completion_ids: list[list[int]]
    """Target token ids of each sequence (no padding)."""
    upweight_token_ids: list[list[int]] | None = None
    """Per sequence, token ids whose cross-entropy is multiplied by
    `loss.name_token_weight` (e.g. the tokens of the concept names)."""

    def __post_init__(self) -> None:
        B = len(self.prompt_texts)
        if B == 0:
            raise ValueError("SFTBatch: empty batch")
        _check_list("image_paths", self.image_paths, B)
        _check_list("completion_ids", self.completion_ids, B)
        _check_completions(self.completion_ids)
        if self.upweight_token_ids is not None:
            _check_list("upweight_token_ids", self.upweight_token_ids, B)

    def __len__(self) -> int:
        return len(self.prompt_texts)

    @property
    def mask_BT(self) -> torch.Tensor:
        return completion_mask(self.completion_ids)

    def token_weights_BT(self, weight: float) -> torch.Tensor:
        """1 on ordinary target tokens, `weight` on up-weighted ones, 0 on padding."""
        mask_BT = self.mask_BT
        if self.upweight_token_ids is None or weight == 1.0:
            return mask_BT
        w_BT = mask_BT.clone()
        for b, (ids, up) in enumerate(zip(self.completion_ids, self.upweight_token_ids)):
            up_set = set(up)
            hit = torch.tensor([t in up_set for t in ids], dtype=torch.bool)
            w_BT[b, : len(ids)][hit] = weight
        return w_BT

    def select(self, idx: list[int]) -> SFTBatch:
        up = None if self.upweight_token_ids is None else [self.upweight_token_ids[i] for i in idx]
        return SFTBatch(
            [self.prompt_texts[i] for i in idx],
            [self.image_paths[i] for i in idx],
            [self.completion_ids[i] for i in idx],
            up,
        )


@dataclass
class TrainStats:
    """What one optimizer step reports (averaged over the whole batch, all ranks)."""

    loss: float
    """Total loss that was minimized."""
    policy_loss: float
    """PPO clipped-surrogate part (SFT: the cross-entropy)."""
    kl: float
    """Mean KL(policy || reference) estimate over completion tokens (0 if not computed)."""
    clip_frac: float
    """Fraction of tokens whose ratio was clipped."""
    entropy: float
    """Mean token entropy of the policy."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate used for this step."""
    tokens: int
    """Completion tokens trained on (all ranks)."""
    value_loss: float = 0.0
    """Critic loss (PPO with a value head), else 0."""
    policy_version: int = 0
    """Number of optimizer steps taken after this one."""
    logprob_mismatch: float = float("nan")
    """Token mean of |learner log-prob - `old_logprobs_BT` as sent| before the update, on
    the training forward (an eval forward for an on-policy batch when the policy has
    dropout); for rollout log-probs, the learner-vs-rollout mismatch. NaN for SFT."""
    ptx_loss: float = float("nan")
    """Cross-entropy of the SFT batch mixed into an RL step (`algo.ptx_coef`), before the
    coefficient; NaN when none was."""
