"""Caption quality beside the names: reference metrics and degeneration measures.

Per set of captions (one evaluation split, or all splits pooled):

    cider_d      CIDEr-D against the references (0-10 scale; document frequencies from
                 the references of the scored set, as pycocoevalcap's corpus mode)
    bleu4        BLEU-4 (corpus level, pycocoevalcap)
    meteor       METEOR (pycocoevalcap's Java scorer; absent when Java is not installed)
    rouge_l      ROUGE-L (mean over captions, pycocoevalcap)
    rep4         mean over captions of the fraction of word 4-grams that repeat an
                 earlier 4-gram of the same caption (0: no loops)
    distinct2    distinct word bigrams / all word bigrams over the whole set
    mean_words   mean caption length in words
    at_cap       share of captions that stopped at the token limit (when known)

Every text goes through `simple_tokenize` (lower case, punctuation dropped), the tokenizer
of the CIDEr-D reward, so evaluation and reward count n-grams the same way and no Java
tokenizer process is started. A degenerate caption (a looping phrase, an empty or
truncated one) scores low on the reference metrics and high on `rep4`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from repic_ray.rewards.caption import CiderD, repetition_fraction, simple_tokenize

QUALITY_KEYS = (
    "cider_d", "bleu4", "meteor", "rouge_l", "rep4", "distinct2", "mean_words", "at_cap",
)
"""Keys of `caption_quality`, in display order."""

HIGHER_IS_BETTER = {"cider_d", "bleu4", "meteor", "rouge_l", "distinct2"}


def repeated_ngram_rate(caption: str, n: int = 4) -> float:
    """Fraction of the caption's word n-grams that repeat an earlier one of the same caption."""
    return repetition_fraction(caption, n)


def distinct_n(captions: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over every caption (0 when there are none)."""
    grams: list[tuple[str, ...]] = []
    for c in captions:
        words = simple_tokenize(c).split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degeneration(captions: Sequence[str]) -> dict[str, float]:
    """The reference-free measures: `rep4`, `distinct2`, `mean_words` (0 without captions)."""
    if not captions:
        return {"rep4": 0.0, "distinct2": 0.0, "mean_words": 0.0}
    return {
        "rep4": float(np.mean([repeated_ngram_rate(c, 4) for c in captions])),
        "distinct2": distinct_n(captions, 2),
        "mean_words": float(np.mean([len(simple_tokenize(c).split()) for c in captions])),
    }


def _meteor_scorer():
    """pycocoevalcap's METEOR (a Java subprocess), or None without Java."""
    if shutil.which("java") is None:
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def close_meteor(scorer: Any) -> None:
    """Stop a METEOR scorer's Java process and close its pipes (pycocoevalcap's `__del__`
    leaves the process's stdout open, which Python reports as an unclosed file)."""
    if scorer is None:
        return
    proc = scorer.meteor_p
    with scorer.lock:
        proc.stdin.close()
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def caption_quality(
    captions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    at_cap: Sequence[bool] | None = None,
    meteor: Any = None,
) -> dict[str, float]:
    """Quality of `captions` (one per image) against `references` (a list per image).

    `at_cap`: per caption, whether it stopped at the token limit (omitted: no `at_cap`).
    `meteor`: a pycocoevalcap `Meteor` to reuse (None: started here, when Java exists).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    if not captions:
        raise ValueError("captions: nothing to score")
    if len(references) != len(captions):
        raise ValueError(f"references: {len(references)} lists for {len(captions)} captions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}]: expected a non-empty list of reference captions")
    if at_cap is not None and len(at_cap) != len(captions):
        raise ValueError(f"at_cap: {len(at_cap)} flags for {len(captions)} captions")
    # pycocoevalcap's scorers want non-empty hypotheses; an empty caption is one unknown word.
    res = {i: [simple_tokenize(c) or "<empty>"] for i, c in enumerate(captions)}
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider = CiderD([list(r) for r in references])
    out = {
        "cider_d": float(np.mean([cider.score(c, r) for c, r in zip(captions, references)])),
        "bleu4": float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
        "rouge_l": float(Rouge().compute_score(gts, res)[0]),
    }
    own = meteor is None
    scorer = _meteor_scorer() if own else meteor
    if scorer is not None:
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            if own:
                close_meteor(scorer)
    out.update(degeneration(captions))
    if at_cap is not None:
        out["at_cap"] = float(np.mean([bool(x) for x in at_cap]))
    return {k: out[k] for k in QUALITY_KEYS if k in out}


def split_quality(
    splits: Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]], Sequence[bool] | None]],
    *,
    meteor: Any = None,
) -> dict[str, dict[str, float]]:
    """`caption_quality` per split (name -> (captions, references, at_cap or None)) and
    over all splits pooled (key "pooled"); one METEOR process serves every call."""
    if not splits:
        raise ValueError("splits: nothing to score")
    own = meteor is None
    meteor = _meteor_scorer() if own else meteor
    try:
        out = {
            name: caption_quality(caps, refs, at_cap=cap, meteor=meteor)
            for name, (caps, refs, cap) in splits.items()
        }
        caps = [c for v in splits.values() for c in v[0]]
        refs = [r for v in splits.values() for r in v[1]]
        flags = None
        if all(v[2] is not None for v in splits.values()):
            flags = [f for v in splits.values() for f in v[2]]
        out["pooled"] = caption_quality(caps, refs, at_cap=flags, meteor=meteor)
    finally:
        if own:
            close_meteor(meteor)
    return out


def quality_drops(
    before: Mapping[str, float], after: Mapping[str, float], *, rep4_slack: float = 0.02,
    length_tolerance: float = 0.25, at_cap_limit: float = 0.05,
) -> list[str]:
    """Why `after` is worse than `before` (empty: not worse). CIDEr-D lower, repeated
    4-grams above before + rep4_slack, mean length off by more than length_tolerance
    (relative), or more than at_cap_limit of captions at the token limit."""
    why = []
    if after.get("cider_d", 0.0) < before.get("cider_d", 0.0):
        why.append(f"CIDEr-D {before['cider_d']:.2f} -> {after['cider_d']:.2f}")
    if after.get("rep4", 0.0) > before.get("rep4", 0.0) + rep4_slack:
        why.append(f"repeated 4-grams {before.get('rep4', 0.0):.2f} -> {after['rep4']:.2f}")
    lb, la = before.get("mean_words", 0.0), after.get("mean_words", 0.0)
    if lb and abs(la - lb) > length_tolerance * lb:
        why.append(f"mean words {lb:.1f} -> {la:.1f}")
    if after.get("at_cap", 0.0) > at_cap_limit:
        why.append(f"{100 * after['at_cap']:.0f}% of captions at the token limit")
    return why
