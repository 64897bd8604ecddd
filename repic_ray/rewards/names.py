"""Name precision / recall reward: no detector, uses the known concepts of the query image.

The caption's names are found with `repic_ray.matching.find_names` — the same
matcher as the evaluation metric — among the sample's `candidate_names` (the
references shown) and `concept_names` (those actually in the image).

    correct = named ∩ concept_names        wrong = named − concept_names
    recall    = |correct| / |concept_names|
    precision = |correct| / |named|          (0 when nothing is named)

Two forms (`NameRewardConfig.mode`):

- ``"f1"``: 2·P·R / (P + R) (0 when P + R = 0);
- ``"recall_minus_wrong"``: R − λ·|wrong| / |concept_names|, so with λ >= 1 a
  wrongly named reference costs at least as much as a missed concept. A penalty
  below that is reward-hacked by naming every reference (measured: recall − 0.5·wrong
  raised wrong names per caption from 0.73 to 1.20).

`repeat_penalty` (μ, default 0) also subtracts μ·|repeats| / |concept_names|, where a
repeat is a mention of a reference name beyond its first. A caption names each
concept once (every reference caption of the synthetic world does); without this
term a caption that names a second object with a name it already used correctly
("Kadki the orange car ... Kadki the blue shoe") loses nothing, while guessing the
second object's name risks the wrong-name penalty, so RL learns to repeat names.

`grounding` ("category") counts a present concept as recalled only where the sentence of
one of its mentions, cut at the names before and after it, holds the concept's
category word (`RewardInput.categories`, given when a concept is registered: "Bo the red
dog", not "Bo the blue mug" when Bo is a dog). Without it a caption that writes a present
name on another object ("Bo the mug ... Bo the dog") earns full recall for names it did not
bind to what it describes; with it only the naming the image supports is rewarded, the
multi-concept binding that the name count alone cannot see. Mentions of a present concept
described with another reference's category and not its own are logged as
"name/misbound". Concepts without a category entry fall back to the plain match.

Samples whose image has no concepts: recall is undefined; the reward is then
−λ·|wrong| ("recall_minus_wrong") or 1 if nothing is named else 0 ("f1").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repic_ray.matching import (
    MODES,
    count_mentions,
    find_names,
    name_key,
    name_spans,
    split_found,
)
from repic_ray.rewards.base import CAPTION_TASKS, RewardInput, RewardOutput, caption_mask_B

NAME_REWARD_MODES = ("f1", "recall_minus_wrong")
GROUNDING_MODES = ("none", "category")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


@dataclass
class NameRewardConfig:
    """Name precision / recall reward (no detector)."""

    mode: str = "f1"
    """"f1" (harmonic mean of name precision and recall) or "recall_minus_wrong"."""
    wrong_penalty: float = 1.0
    """λ in recall − λ·wrong/|concepts|; keep >= 1 so naming every reference does not pay."""
    repeat_penalty: float = 0.0
    """μ in − μ·repeats/|concepts|: a repeat is a mention of a reference name beyond its first."""
    match_mode: str = "default"
    """Name matcher mode: "default" (whole-word phrases) or "compat" (RePIC's token match)."""
    case_sensitive: bool = False
    """Match names with exact letter case."""
    grounding: str = "none"
    """"none" (a present name anywhere counts) or "category" (a present concept counts only
    where a sentence naming it, cut at the other names in it, holds its category word;
    needs the concepts' categories, as the detector reward does)."""

    def __post_init__(self) -> None:
        if self.mode not in NAME_REWARD_MODES:
            raise ValueError(f"mode: must be one of {NAME_REWARD_MODES}, got {self.mode!r}")
        if self.wrong_penalty < 0:
            raise ValueError(f"wrong_penalty: must be >= 0, got {self.wrong_penalty}")
        if self.repeat_penalty < 0:
            raise ValueError(f"repeat_penalty: must be >= 0, got {self.repeat_penalty}")
        if self.grounding not in GROUNDING_MODES:
            raise ValueError(
                f"grounding: must be one of {GROUNDING_MODES}, got {self.grounding!r}"
            )
        if self.grounding != "none" and self.match_mode != "default":
            raise ValueError("grounding: needs match_mode 'default' (mentions with positions)")
        if self.match_mode not in MODES:
            raise ValueError(f"match_mode: must be one of {MODES}, got {self.match_mode!r}")


def name_scores(
    caption: str,
    concept_names: Sequence[str],
    candidate_names: Sequence[str],
    match_mode: str = "default",
    case_sensitive: bool = False,
) -> tuple[int, int, int]:
    """(correct, wrong, number of concepts) for one caption, via the shared matcher."""
    found = find_names(
        caption, [*concept_names, *candidate_names], mode=match_mode, case_sensitive=case_sensitive
    )
    correct, wrong = split_found(found, concept_names, case_sensitive)
    n_gt = len({name_key(c, case_sensitive) for c in concept_names})
    return len(correct), len(wrong), n_gt


def mention_segments(
    caption: str, names: Sequence[str], case_sensitive: bool = False
) -> list[tuple[str, str]]:
    """(name key, description) of every mention of `names` in `caption`, in text order.

    A mention's description is the rest of its sentence, cut at the names before and after
    it in that sentence: "Bo the red dog sits at the top." and "The red dog at the top is
    Bo." both describe Bo as a red dog.
    """
    spans = name_spans(caption, names, case_sensitive=case_sensitive)
    ends = [m.start() + 1 for m in _SENTENCE_END.finditer(caption)]
    out: list[tuple[str, str]] = []
    for i, (start, end, name) in enumerate(spans):
        lo = max([0, *(e for e in ends if e <= start)])
        hi = min([len(caption), *(e for e in ends if e > end - 1)])
        if i > 0:
            lo = max(lo, spans[i - 1][1])
        if i + 1 < len(spans):
            hi = min(hi, spans[i + 1][0])
        out.append((name_key(name, case_sensitive), caption[lo:start] + " " + caption[end:hi]))
    return out


def grounded_names(
    caption: str,
    concept_names: Sequence[str],
    candidate_names: Sequence[str],
    categories: dict[str, str],
    case_sensitive: bool = False,
) -> tuple[set[str], int]:
    """(keys of present concepts named with their own category, misbound mentions).

    A mention (its description as `mention_segments` cuts it) grounds the concept when the
    description holds the concept's category as a whole word (a plural "s" allowed). A
    present concept without a category entry is grounded by any mention. A misbound mention
    is one of a present concept whose description holds another reference's category and
    not its own.
    """
    names = [*concept_names, *candidate_names]
    present = {name_key(c, case_sensitive) for c in concept_names}
    grounded: set[str] = set()
    misbound = 0
    # the references' categories, keyed like the names ("<Bo>" in `categories` serves "Bo")
    keys = {name_key(n, case_sensitive) for n in names}
    cats: dict[str, str] = {}
    for n, c in categories.items():
        if (k := name_key(n, case_sensitive)) in keys:
            cats.setdefault(k, c)
    for key, text in mention_segments(caption, names, case_sensitive):
        if key not in present:
            continue
        own = cats.get(key)
        if own is None:
            grounded.add(key)
            continue
        words = set(re.findall(r"[a-z]+", text.lower()))
        words |= {w[:-1] for w in words if w.endswith("s")}
        if own.lower() in words:
            grounded.add(key)
        elif any(c is not None and c.lower() in words for c in cats.values()):
            misbound += 1
    return grounded, misbound


def name_repeats(
    caption: str,
    names: Sequence[str],
    match_mode: str = "default",
    case_sensitive: bool = False,
) -> int:
    """Mentions of `names` beyond the first of each (names compared by `name_key`)."""
    by_key: dict[str, int] = {}
    counts = count_mentions(caption, list(dict.fromkeys(names)), mode=match_mode,
                            case_sensitive=case_sensitive)
    for name, n in counts.items():
        key = name_key(name, case_sensitive)
        by_key[key] = max(by_key.get(key, 0), n)
    return sum(max(0, n - 1) for n in by_key.values())


class NameReward:
    """Per-caption name precision/recall reward; 0 for non-caption tasks.

    Components: "name" (the reward), "name/precision", "name/recall", "name/wrong"
    (count of wrongly named references), "name/repeats" (mentions of a reference name
    beyond its first), and with grounding "name/misbound" (mentions of a present concept
    described as another reference's category).
    """

    def __init__(
        self, cfg: NameRewardConfig | None = None, caption_tasks: Sequence[str] = CAPTION_TASKS
    ) -> None:
        self.cfg = cfg or NameRewardConfig()
        self.caption_tasks = tuple(caption_tasks)

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        cfg = self.cfg
        B = len(batch)
        reward_B, prec_B, rec_B, wrong_B, rep_B, mis_B = (np.zeros(B) for _ in range(6))
        mask_B = caption_mask_B(batch, self.caption_tasks)
        for i, x in enumerate(batch):
            if not mask_B[i]:
                continue
            correct, wrong, n_gt = name_scores(
                x.completion, x.concept_names, x.candidate_names, cfg.match_mode, cfg.case_sensitive
            )
            named = correct + wrong
            if cfg.grounding == "category":
                keys, mis_B[i] = grounded_names(
                    x.completion, x.concept_names, x.candidate_names, x.categories,
                    cfg.case_sensitive,
                )
                correct = len(keys)
            precision = correct / named if named else 0.0
            recall = correct / n_gt if n_gt else 0.0
            if cfg.mode == "f1":
                if n_gt == 0:
                    reward = 1.0 if named == 0 else 0.0
                else:
                    s = precision + recall
                    reward = 2 * precision * recall / s if s > 0 else 0.0
            else:
                reward = recall - cfg.wrong_penalty * wrong / max(1, n_gt)
            repeats = name_repeats(
                x.completion, [*x.concept_names, *x.candidate_names], cfg.match_mode,
                cfg.case_sensitive,
            )
            reward -= cfg.repeat_penalty * repeats / max(1, n_gt)
            reward_B[i], prec_B[i], rec_B[i], wrong_B[i] = reward, precision, recall, wrong
            rep_B[i] = repeats
        return RewardOutput(
            reward_B,
            {
                "name": reward_B.copy(),
                "name/precision": prec_B,
                "name/recall": rec_B,
                "name/wrong": wrong_B,
                "name/repeats": rep_B,
                **({"name/misbound": mis_B} if cfg.grounding != "none" else {}),
            },
        )
