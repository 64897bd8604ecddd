"""Description reward: is what the caption says about the objects true, and does each name
sit on the object it names? Verifiable where the query image's objects are known (the
synthetic world's `objects`: colour, pattern, category and, for a concept, its name).

The name reward counts a present name anywhere in the caption, and CIDEr-D rewards the
reference captions' words, so neither sees "Bo the blue mug" written about Bo the red dog,
or a "green striped car" that is not in the image. This reward does:

    truth = (true − false) / phrases     over the caption's "<colour> <pattern> <category>"
                                         phrases: true when an object drawn in the image has
                                         those three attributes (0 when there is none)
    bound = |present concepts with a mention described by their own three attributes|
            / |present concepts|         (the mention's description as
                                         `repic_ray.rewards.names.mention_segments` cuts it:
                                         "Bo the red dotted dog ..." or "The red dotted dog
                                         ... is Bo.")

    reward = truth_weight · truth + bound_weight · bound      (caption tasks with objects)

A sample without objects scores 0 (the reward has nothing to check). Components:
"description" (the reward), "description/truth", "description/phrases",
"description/bound".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repic_ray.data.vocab import COLOURS, PATTERNS, SHAPE_CATEGORY
from repic_ray.matching import name_key
from repic_ray.rewards.base import CAPTION_TASKS, RewardInput, RewardOutput, caption_mask_B
from repic_ray.rewards.names import mention_segments

_CATEGORIES = tuple(sorted(set(SHAPE_CATEGORY.values())))
PHRASE = re.compile(
    r"(?=\b(" + "|".join(COLOURS) + r") (" + "|".join(PATTERNS) + r") ("
    + "|".join(_CATEGORIES) + r")s?\b)"
)
"""A "<colour> <pattern> <category>" phrase of the synthetic world's words (lower case)."""


def phrases(text: str) -> list[tuple[str, str, str]]:
    """Every (colour, pattern, category) phrase in `text`, in order."""
    return [m.groups() for m in PHRASE.finditer(text.lower())]


def attributes(obj: dict) -> tuple[str, str, str]:
    """A drawn object's (colour, pattern, category)."""
    return obj.get("colour"), obj.get("pattern"), obj.get("category")


def drawn(objects: Sequence[dict]) -> set[tuple[str, str, str]]:
    """The (colour, pattern, category) of every drawn object."""
    return {attributes(o) for o in objects}


def description_scores(
    caption: str, concept_names: Sequence[str], candidate_names: Sequence[str],
    objects: Sequence[dict], case_sensitive: bool = False,
) -> tuple[int, int, int, int]:
    """(phrases, true phrases, present concepts bound to their own description, present
    concepts) of one caption."""
    found = phrases(caption)
    in_image = drawn(objects)
    true = sum(f in in_image for f in found)
    own = {name_key(o["name"], case_sensitive): attributes(o) for o in objects if o.get("name")}
    present = {name_key(c, case_sensitive) for c in concept_names}
    bound: set[str] = set()
    for key, text in mention_segments(caption, [*concept_names, *candidate_names], case_sensitive):
        if key in present and key in own and own[key] in phrases(text):
            bound.add(key)
    return len(found), true, len(bound), len(present)


@dataclass
class DescriptionRewardConfig:
    """True descriptions and names bound to them (needs the query image's objects)."""

    truth_weight: float = 1.0
    """Weight of (true − false) / phrases over the caption's attribute phrases."""
    bound_weight: float = 1.0
    """Weight of the share of present concepts named with their own attributes."""
    case_sensitive: bool = False
    """Match names with exact letter case."""

    def __post_init__(self) -> None:
        for key in ("truth_weight", "bound_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")


class DescriptionReward:
    """Per-caption description truth and name binding; 0 for non-caption tasks and for
    samples whose objects are not known."""

    def __init__(
        self, cfg: DescriptionRewardConfig | None = None,
        caption_tasks: Sequence[str] = CAPTION_TASKS,
    ) -> None:
        self.cfg = cfg or DescriptionRewardConfig()
        self.caption_tasks = tuple(caption_tasks)

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        cfg = self.cfg
        B = len(batch)
        reward_B, truth_B, phrases_B, bound_B = (np.zeros(B) for _ in range(4))
        mask_B = caption_mask_B(batch, self.caption_tasks)
        for i, x in enumerate(batch):
            if not mask_B[i] or not x.objects:
                continue
            n, true, bound, present = description_scores(
                x.completion, x.concept_names, x.candidate_names, x.objects, cfg.case_sensitive)
            truth_B[i] = (2 * true - n) / n if n else 0.0
            phrases_B[i] = n
            bound_B[i] = bound / present if present else 0.0
            reward_B[i] = cfg.truth_weight * truth_B[i] + cfg.bound_weight * bound_B[i]
        return RewardOutput(reward_B, {
            "description": reward_B.copy(),
            "description/truth": truth_B,
            "description/phrases": phrases_B,
            "description/bound": bound_B,
        })
