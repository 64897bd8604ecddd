"""Weighted sum of reward components, configured by `RewardConfig`.

    total_B = verifiable_weight · verifiable_B        (every task; chosen by `task`)
            + name_weight       · name_B              (caption tasks only)
            + detector_weight   · detector_B          (caption tasks only)
            + caption_weight    · caption_B           (caption tasks only)
            + description_weight · description_B      (caption tasks only)

Caption tasks are `RewardConfig.caption_tasks` (default: yes_no_name,
yes_no_name_multi, caption); on other tasks (yes_no, iou) the caption-level
components are 0. A component with weight 0 is not built (the detector is never
loaded, no reference corpus is needed). Every component of every built reward is
returned for logging, each key prefixed by its reward's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from repic_ray.rewards.base import CAPTION_TASKS, TASKS, Reward, RewardInput, RewardOutput
from repic_ray.rewards.caption import CaptionReward, CaptionRewardConfig
from repic_ray.rewards.description import DescriptionReward, DescriptionRewardConfig
from repic_ray.rewards.detector import DetectorReward, DetectorRewardConfig, unpack_detector
from repic_ray.rewards.names import NameReward, NameRewardConfig
from repic_ray.rewards.verifiable import VerifiableConfig, VerifiableReward


@dataclass
class RewardConfig:
    """Which rewards are summed, with what weights, and their settings."""

    verifiable_weight: float = 1.0
    """Weight of RePIC's verifiable reward (yes_no / iou / yes_no_name / yes_no_name_multi)."""
    name_weight: float = 0.0
    """Weight of the name precision/recall reward (no detector)."""
    detector_weight: float = 0.0
    """Weight of the detector-verified recognition reward (loads the detector when > 0)."""
    caption_weight: float = 0.0
    """Weight of the caption-quality reward (CIDEr-D and penalties; needs a reference corpus)."""
    description_weight: float = 0.0
    """Weight of the description reward (true attribute phrases, names bound to their own
    object's attributes; needs the query images' objects, as the synthetic world gives)."""
    caption_tasks: list[str] = field(default_factory=lambda: list(CAPTION_TASKS))
    """Tasks whose completions are captions; name/detector/caption rewards apply only to these."""
    verifiable: VerifiableConfig = field(default_factory=VerifiableConfig)
    """RePIC's verifiable rewards."""
    name: NameRewardConfig = field(default_factory=NameRewardConfig)
    """Name precision/recall reward."""
    detector: DetectorRewardConfig = field(default_factory=DetectorRewardConfig)
    """Detector-verified recognition reward."""
    caption: CaptionRewardConfig = field(default_factory=CaptionRewardConfig)
    """Caption-quality reward."""
    description: DescriptionRewardConfig = field(default_factory=DescriptionRewardConfig)
    """Description reward."""

    def __post_init__(self) -> None:
        for key in ("verifiable_weight", "name_weight", "detector_weight", "caption_weight",
                    "description_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        bad = [t for t in self.caption_tasks if t not in TASKS]
        if bad:
            raise ValueError(f"caption_tasks: unknown task(s) {bad}; known: {TASKS}")


class CompositeReward:
    """Weighted sum of named rewards; returns the total and every component.

    Args:
        parts: (name, weight, reward) triples; `name` is the component key of the
            reward's main value (e.g. "verifiable"), which is also logged.
    """

    def __init__(self, parts: Sequence[tuple[str, float, Reward]]) -> None:
        if not parts:
            raise ValueError("parts: a composite reward needs at least one component")
        self.parts = list(parts)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        total_B = np.zeros(len(batch))
        components: dict[str, np.ndarray] = {}
        for name, weight, reward in self.parts:
            out = reward(batch)
            total_B += weight * out.rewards_B
            components[name] = out.rewards_B
            for key, value in out.components.items():
                components[key if key.startswith(name) else f"{name}/{key}"] = value
        return RewardOutput(total_B, components)


def build_reward(
    cfg: RewardConfig,
    *,
    reference_corpus: Sequence[Sequence[str]] | None = None,
    detector: tuple[Any, Any] | None = None,
) -> CompositeReward:
    """Build the composite reward of `cfg`; only components with weight > 0 are built.

    Args:
        cfg: reward settings.
        reference_corpus: one list of reference captions per image, fixing CIDEr-D's
            document frequencies (instead of `cfg.caption.references_path`).
        detector: an already loaded detector, the model and processor pair as
            `load_detector` returns it (instead of loading `cfg.detector.checkpoint`).
    """
    tasks = cfg.caption_tasks
    parts: list[tuple[str, float, Reward]] = []
    if cfg.verifiable_weight > 0:
        parts.append(("verifiable", cfg.verifiable_weight, VerifiableReward(cfg.verifiable)))
    if cfg.name_weight > 0:
        parts.append(("name", cfg.name_weight, NameReward(cfg.name, tasks)))
    if cfg.detector_weight > 0:
        model, processor = unpack_detector(detector) if detector is not None else (None, None)
        parts.append(
            ("detector", cfg.detector_weight, DetectorReward(cfg.detector, model, processor, tasks))
        )
    if cfg.caption_weight > 0:
        parts.append(
            ("caption", cfg.caption_weight, CaptionReward(cfg.caption, reference_corpus, tasks))
        )
    if cfg.description_weight > 0:
        parts.append(("description", cfg.description_weight,
                      DescriptionReward(cfg.description, tasks)))
    if not parts:
        raise ValueError("RewardConfig: every weight is 0; set at least one *_weight > 0")
    return CompositeReward(parts)
