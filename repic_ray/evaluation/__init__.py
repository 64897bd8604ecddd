"""Evaluation: RePIC's name precision / recall / F1 and standard caption metrics.

- `metric`: the per-slot name metric (default and RePIC-compat matching), split by
  number of concepts; shares its matcher with the rewards.
- `caption_metrics`: BLEU-4 / METEOR / ROUGE-L / CIDEr via pycocoevalcap (SPICE
  reported unavailable offline).
- `cli`: `repic eval`; `report`: markdown table and plots comparing methods.
"""

from repic_ray.evaluation.metric import (
    NameEvaluation,
    NameMetrics,
    compat_case_sensitive,
    evaluate_names,
    slot_outcomes,
)

__all__ = [
    "NameEvaluation",
    "NameMetrics",
    "compat_case_sensitive",
    "evaluate_names",
    "slot_outcomes",
]
