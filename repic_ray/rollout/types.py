"""Typed messages of the rollout engines: what goes in, what comes out."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutRequest:
    """One prompt to sample completions for.

    `prompt_text` is the fully rendered chat prompt (chat template applied), holding one
    image placeholder (`<|vision_start|><|image_pad|><|vision_end|>`) per entry of
    `image_paths`, in the same order.
    """

    uid: str
    prompt_text: str
    image_paths: list[str] = field(default_factory=list)
    n: int | None = None
    """Completions to sample; None uses `SamplingConfig.n`."""


@dataclass
class Completion:
    """One sampled completion with the log-prob of each sampled token."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    """Log-prob of each sampled token (same length as `token_ids`)."""
    finish_reason: str
    """"stop" (end-of-sequence token or a stop string) or "length" (hit max_tokens)."""
    policy_version: int
    """Version of the weights that produced it (set by `update_lora` / `update_full`)."""


@dataclass
class RolloutResult:
    """All completions of one request, in sample order."""

    uid: str
    completions: list[Completion]
