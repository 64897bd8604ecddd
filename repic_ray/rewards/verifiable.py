"""RePIC's three verifiable rewards (object consistency, localization, identity).

Reproduced from oyt9306/RePIC
``training/src/open-r1-multimodal/src/open_r1/grpo_multitask_multi_img_no_format.py``
(`yes_no_reward`, `iou_reward` / `_iou`, `yes_no_answer_reward`,
`yes_no_answer_reward_multi`, `accuracy_reward`). Exact semantics, including the
quirks:

- `yes_no`: the first *substring* "yes" or "no" of the lower-cased output (no
  word boundaries, as in RePIC: "I know" reads as "no") must equal the first one
  in the answer.
- `iou`: the first ``[x1, y1, x2, y2]`` in the output; IoU with RePIC's
  inclusive-coordinate intersection (``min(x2) - 1``, ``+1``) and exclusive
  areas; reward 1 if IoU >= threshold (0.5). One extension: coordinates may be
  decimals or negative (RePIC's regex takes only non-negative integers; on
  integer outputs the two agree unless a decimal box comes first).
- `yes_no_name`: 0 if the output is shorter than 100 characters; otherwise 1 if
  the answer string occurs verbatim (case-sensitive substring) — and, when the
  answer starts with "<" (e.g. "<Bo>"), 0 if its closing form ("</Bo>") also
  occurs (reward-hacking guard).
- `yes_no_name_multi`: 0 below 100 characters; otherwise the fraction of answer
  strings that occur verbatim. RePIC applies *no* closing-tag guard here;
  `VerifiableConfig.multi_closing_tag_guard` adds it per name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repic_ray.rewards.base import RewardInput, RewardOutput

_NUM = r"(-?\d+(?:\.\d+)?)"
BBOX_REGEX = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")


@dataclass
class VerifiableConfig:
    """RePIC's verifiable rewards."""

    min_caption_chars: int = 100
    """Identity rewards are 0 for outputs shorter than this many characters (RePIC: 100)."""
    iou_threshold: float = 0.5
    """`iou` reward is 1 when IoU >= this (RePIC: 0.5)."""
    multi_closing_tag_guard: bool = False
    """Also apply the closing-tag guard per name in `yes_no_name_multi` (RePIC does not)."""

    def __post_init__(self) -> None:
        if self.min_caption_chars < 0:
            raise ValueError(f"min_caption_chars: must be >= 0, got {self.min_caption_chars}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold: must be in [0, 1], got {self.iou_threshold}")


def yes_no_reward(content: str, solution: str) -> float:
    """1.0 if the first "yes"/"no" substring of the output equals the answer's, else 0.0."""
    gt = re.search(r"(yes|no)", (solution or "").lower())
    out = re.search(r"(yes|no)", (content or "").lower())
    return 1.0 if gt and out and gt.group(1) == out.group(1) else 0.0


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """RePIC's `_iou`: inclusive-coordinate intersection over exclusive-coordinate union."""
    x11, y11, x12, y12 = box1
    x21, y21, x22, y22 = box2
    inter_x1, inter_y1 = max(x11, x21), max(y11, y21)
    inter_x2, inter_y2 = min(x12 - 1, x22 - 1), min(y12 - 1, y22 - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    area1 = max(0, x12 - x11) * max(0, y12 - y11)
    area2 = max(0, x22 - x21) * max(0, y22 - y21)
    union = max(1, area1 + area2 - inter)
    return float(inter) / float(union)


def parse_first_box(content: str) -> list[float] | None:
    """The first `[x1, y1, x2, y2]` in free text or JSON (e.g. `{"bbox_2d": [...]}`), or None."""
    m = BBOX_REGEX.search(content or "")
    if m is None:
        return None
    return [float(v) if "." in v else int(v) for v in m.groups()]


def iou_reward(content: str, solution: Sequence[float], threshold: float = 0.5) -> float:
    """1.0 if the first box in the output has IoU >= threshold with `solution`, else 0.0."""
    pred = parse_first_box(content)
    if pred is None:
        return 0.0
    return 1.0 if box_iou(pred, solution) >= threshold else 0.0


def _closing_form(name: str) -> str | None:
    return name.replace("<", "</") if name.startswith("<") else None


def yes_no_name_reward(content: str, solution: str, min_chars: int = 100) -> float:
    """RePIC's identity reward for one name (length rule + closing-tag guard)."""
    if len(content) < min_chars:
        return 0.0
    if solution not in content:
        return 0.0
    closing = _closing_form(solution)
    return 0.0 if closing is not None and closing in content else 1.0


def yes_no_name_multi_reward(
    content: str, solution: Sequence[str], min_chars: int = 100, closing_tag_guard: bool = False
) -> float:
    """Fraction of names found verbatim; 0 below `min_chars` (guard per name only if asked)."""
    if len(content) < min_chars or len(solution) == 0:
        return 0.0
    hits = 0
    for name in solution:
        found = name in content
        if found and closing_tag_guard:
            closing = _closing_form(name)
            found = closing is None or closing not in content
        hits += int(found)
    return hits / len(solution)


def _box_solution(solution: object, index: int) -> list[float]:
    if isinstance(solution, str):
        try:
            solution = json.loads(solution)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"sample {index}: iou solution {solution!r} is not a JSON box"
            ) from exc
    if (
        not isinstance(solution, (list, tuple))
        or len(solution) != 4
        or not all(isinstance(v, (int, float)) for v in solution)
    ):
        raise ValueError(f"sample {index}: iou solution must be [x1, y1, x2, y2], got {solution!r}")
    return list(solution)


def _names_solution(solution: object, index: int, task: str) -> list[str]:
    if isinstance(solution, str):
        return [solution]
    if isinstance(solution, (list, tuple)) and all(isinstance(s, str) for s in solution):
        return list(solution)
    raise ValueError(
        f"sample {index}: {task} solution must be a name or list of names, got {solution!r}"
    )


class VerifiableReward:
    """RePIC's `accuracy_reward`: one verifiable reward per sample, chosen by its `task`.

    Samples with task "caption" have no verifiable answer and get 0.
    Components: "verifiable" (the reward itself).
    """

    def __init__(self, cfg: VerifiableConfig | None = None) -> None:
        self.cfg = cfg or VerifiableConfig()

    def score_one(self, x: RewardInput, index: int = 0) -> float:
        cfg = self.cfg
        if x.task == "caption":
            return 0.0
        if x.task == "yes_no":
            if not isinstance(x.solution, str):
                raise ValueError(
                    f"sample {index}: yes_no solution must be a str, got {x.solution!r}"
                )
            return yes_no_reward(x.completion, x.solution)
        if x.task == "iou":
            return iou_reward(x.completion, _box_solution(x.solution, index), cfg.iou_threshold)
        names = _names_solution(x.solution, index, x.task)
        if x.task == "yes_no_name":
            if len(names) != 1:
                raise ValueError(f"sample {index}: yes_no_name expects one name, got {names!r}")
            return yes_no_name_reward(x.completion, names[0], cfg.min_caption_chars)
        return yes_no_name_multi_reward(
            x.completion, names, cfg.min_caption_chars, cfg.multi_closing_tag_guard
        )

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        r_B = np.array([self.score_one(x, i) for i, x in enumerate(batch)], dtype=np.float64)
        return RewardOutput(r_B, {"verifiable": r_B.copy()})
