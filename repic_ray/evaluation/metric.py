"""RePIC's personalized-caption metric: name precision / recall / F1 per ground-truth slot.

For each caption with ground-truth concepts G, the candidate names that occur in
it are found with `repic_ray.matching.find_names` (shared with the rewards).
Per ground-truth slot g:

    g found                                   -> hit
    g not found, some candidate ∉ G found     -> "MISS"
    nothing relevant found                    -> none

    precision = hits / (hits + MISS)   recall = hits / slots   F1 = 2PR / (P + R)

Candidates are all concepts occurring in the result file's ground truth (as in
RePIC's scripts) or an explicit list (the ground truth is always added).

Mode "compat" reproduces oyt9306/RePIC ``evaluation/eval_single_concept.py``,
``eval_multi_2_concept.py`` and ``eval_multi_4_concept.py`` exactly: whitespace
tokens, and a case rule chosen per file — case-sensitive when every record has
exactly two concepts (the 2-concept script), lower-cased otherwise — unless
`case_sensitive` is given. Mode "default" matches whole-word phrases,
case-insensitively unless asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from repic_ray.matching import MODES, find_names, name_key

HIT, MISS = "HIT", "MISS"


def slot_outcomes(
    found: Iterable[str], gt: Sequence[str], candidates: Iterable[str], case_sensitive: bool
) -> list[str | None]:
    """Per ground-truth slot: HIT, MISS or None (see module docstring)."""
    present = {name_key(f, case_sensitive) for f in found}
    non_gt = {name_key(c, case_sensitive) for c in candidates if c not in gt}
    wrong_present = bool(present & non_gt)
    out: list[str | None] = []
    for g in gt:
        if name_key(g, case_sensitive) in present:
            out.append(HIT)
        elif wrong_present:
            out.append(MISS)
        else:
            out.append(None)
    return out


@dataclass
class NameMetrics:
    """Counts and scores for a set of ground-truth slots (scores in [0, 1])."""

    slots: int = 0
    hits: int = 0
    misses: int = 0
    records: int = 0

    def add(self, outcomes: Sequence[str | None]) -> None:
        self.records += 1
        self.slots += len(outcomes)
        self.hits += sum(o == HIT for o in outcomes)
        self.misses += sum(o == MISS for o in outcomes)

    @property
    def precision(self) -> float:
        predicted = self.hits + self.misses
        return self.hits / predicted if predicted else 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.slots if self.slots else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass
class NameEvaluation:
    """Metric over a result file, overall and split by number of ground-truth concepts."""

    overall: NameMetrics
    by_k: dict[int, NameMetrics] = field(default_factory=dict)
    mode: str = "default"
    case_sensitive: bool = False
    candidates: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "case_sensitive": self.case_sensitive,
            "num_candidates": len(self.candidates),
            "overall": self.overall.as_dict(),
            "by_k": {str(k): m.as_dict() for k, m in sorted(self.by_k.items())},
        }


def compat_case_sensitive(gt_lists: Sequence[Sequence[str]]) -> bool:
    """RePIC's case rule: only the 2-concept script is case-sensitive."""
    return len(gt_lists) > 0 and all(len(g) == 2 for g in gt_lists)


def evaluate_names(
    captions: Sequence[str],
    gt_lists: Sequence[Sequence[str]],
    *,
    mode: str = "default",
    candidates: Sequence[str] | None = None,
    case_sensitive: bool | None = None,
) -> NameEvaluation:
    """Score captions against their ground-truth concept lists.

    Args:
        captions: one generated caption per query.
        gt_lists: the ground-truth concepts of each query (non-empty lists).
        mode: "default" or "compat" (see module docstring).
        candidates: names to look for; None: every concept in `gt_lists` (RePIC).
        case_sensitive: None: compat picks RePIC's per-file rule, default mode is
            case-insensitive.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    if len(captions) != len(gt_lists):
        raise ValueError(
            f"captions ({len(captions)}) and gt_lists ({len(gt_lists)}) differ in length"
        )
    for i, gt in enumerate(gt_lists):
        if not gt:
            raise ValueError(f"record {i}: empty ground-truth concept list")
    if case_sensitive is None:
        case_sensitive = compat_case_sensitive(gt_lists) if mode == "compat" else False
    pool = sorted({c for gt in gt_lists for c in gt} | set(candidates or []))
    overall, by_k = NameMetrics(), {}
    for caption, gt in zip(captions, gt_lists):
        found = find_names(caption, pool, mode=mode, case_sensitive=case_sensitive)
        outcomes = slot_outcomes(found, gt, pool, case_sensitive)
        overall.add(outcomes)
        by_k.setdefault(len(gt), NameMetrics()).add(outcomes)
    return NameEvaluation(overall, by_k, mode, case_sensitive, pool)
