"""The one batched signature every reward implements.

A reward is a callable `reward(batch: Sequence[RewardInput]) -> RewardOutput`:
one `RewardInput` per completion (B of them, prompts x generations flattened),
one scalar per completion back in `RewardOutput.rewards_B`, plus named
per-sample components for logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: RePIC's `accu_reward_method` values, plus "caption" for a plain captioning
#: prompt that carries no verifiable answer (only caption-level rewards apply).
TASKS = ("yes_no", "iou", "yes_no_name", "yes_no_name_multi", "caption")

#: Tasks whose completion is a caption (name / detector / caption-quality rewards apply).
CAPTION_TASKS = ("yes_no_name", "yes_no_name_multi", "caption")


@dataclass
class RewardInput:
    """One completion to score, with everything any reward may need about its prompt."""

    completion: str
    """Generated text (decoded, special tokens removed)."""
    task: str = "caption"
    """RePIC's `accu_reward_method` (one of `TASKS`); selects the verifiable reward."""
    solution: Any = None
    """Verifiable answer: "yes"/"no" (yes_no), a name (yes_no_name), a list of names
    (yes_no_name_multi), `[x1, y1, x2, y2]` (iou); None for "caption"."""
    image_path: str | None = None
    """The query image (the detector reward opens it)."""
    concept_names: list[str] = field(default_factory=list)
    """Concepts actually present in the query image (ground truth)."""
    candidate_names: list[str] = field(default_factory=list)
    """Concept names shown to the model as references (present or not)."""
    categories: dict[str, str] = field(default_factory=dict)
    """Concept name -> category word (e.g. "dog"), used to prompt the detector."""
    reference_captions: list[str] = field(default_factory=list)
    """Human / template reference captions of the query image (caption-quality reward)."""
    truncated: bool = False
    """The completion was cut at the sampling token limit (its end is missing)."""
    objects: list[dict] = field(default_factory=list)
    """The query image's drawn objects where known (the synthetic world's: "colour",
    "pattern", "category", and "name" for a concept); the description reward checks the
    caption against them."""

    def __post_init__(self) -> None:
        if not isinstance(self.completion, str):
            raise TypeError(f"completion: expected str, got {type(self.completion).__name__}")
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {TASKS}, got {self.task!r}")
        for name in ("concept_names", "candidate_names", "reference_captions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}: expected a list of str, got {value!r}")
        if not isinstance(self.categories, dict):
            raise TypeError(
                f"categories: expected a dict name -> category, got {self.categories!r}"
            )
        if not isinstance(self.objects, (list, tuple)) or not all(
                isinstance(o, dict) for o in self.objects):
            raise ValueError(f"objects: expected a list of dicts, got {self.objects!r}")


@dataclass
class RewardOutput:
    """Rewards for a batch: the total and every named component, each shaped (B,)."""

    rewards_B: np.ndarray
    """Total reward per completion (float64)."""
    components: dict[str, np.ndarray] = field(default_factory=dict)
    """Named per-completion values for logging (e.g. "name/recall"), each shaped (B,)."""

    def __post_init__(self) -> None:
        self.rewards_B = np.asarray(self.rewards_B, dtype=np.float64)
        if self.rewards_B.ndim != 1:
            raise ValueError(f"rewards_B: expected shape (B,), got {self.rewards_B.shape}")
        for key, value in list(self.components.items()):
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != self.rewards_B.shape:
                raise ValueError(
                    f"components[{key!r}]: shape {arr.shape} != rewards_B shape {self.rewards_B.shape}"
                )
            self.components[key] = arr

    def means(self) -> dict[str, float]:
        """Batch means of the total ("reward") and of every component, for logging."""
        out = {"reward": float(self.rewards_B.mean()) if self.rewards_B.size else 0.0}
        out.update({k: float(v.mean()) if v.size else 0.0 for k, v in self.components.items()})
        return out


class Reward(Protocol):
    """What `CompositeReward` composes: a batched scorer."""

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput: ...


def caption_mask_B(batch: Sequence[RewardInput], caption_tasks: Sequence[str]) -> np.ndarray:
    """1.0 where the sample's task is a caption task, else 0.0 — shape (B,)."""
    return np.array([1.0 if x.task in caption_tasks else 0.0 for x in batch], dtype=np.float64)
