"""Caption-quality reward: per-sample CIDEr-D with corpus-fixed document frequencies.

pycocoevalcap's `Cider` (which is CIDEr-D: clipped n-gram counts and a Gaussian
length penalty, sigma 6) computes IDF from the references passed in *each
call*: a caption scored alone always gets 0, and the same caption scores
differently in different batches. A reward needs a fixed scale, so `CiderD`
computes document frequencies once from the whole reference corpus (one list of
references per image) and then scores any (caption, references) pair on its own.
Its score for an image equals pycocoevalcap's corpus-mode score for that image
when the corpus is the same — including pycocoevalcap's quirk that the length
used by the Gaussian penalty counts *bigrams* (`if n == 1: length += tf`).

Formula (Vedantam et al. 2015, CIDEr-D), for n = 1..4:

    g_n(s)   = tf(ngram, s) * (log N_images - log max(1, df(ngram)))
    sim_n    = Σ min(g_n(c), g_n(r)) g_n(r) / (|g_n(c)| |g_n(r)|) · exp(-(l_c - l_r)² / 2σ²)
    CIDEr-D  = 10 · mean_n( mean_r sim_n(c, r) )

`CaptionReward` adds optional length and repetition penalties that stop
degenerate captions (too short / too long / looping on one phrase).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repic_ray.rewards.base import CAPTION_TASKS, RewardInput, RewardOutput, caption_mask_B

# Punctuation tokens pycocoevalcap's PTBTokenizer drops after tokenizing.
_PTB_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN_RE = re.compile(r"\w+?(?=n't\b)|\w+(?='s\b)|'s\b|n't\b|\w+(?:-\w+)*|\.\.\.|--|[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lower-case, split words and punctuation, drop punctuation; a pure-Python PTB stand-in.

    pycocoevalcap's PTBTokenizer needs a Java process per call — fine for
    evaluation, too slow for rewards. This keeps its main effects (lower case,
    "bo's" -> "bo 's", punctuation removed).
    """
    tokens = _TOKEN_RE.findall(text.lower())
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and t.strip('()[]{}"<>'))


def _ngrams(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies fixed from a reference corpus.

    Args:
        corpus: one list of reference captions per image (the whole training or
            evaluation reference set).
        n: largest n-gram.
        sigma: Gaussian length-penalty width.
        tokenize: applied to every caption and reference (None: already tokenized,
            whitespace-split as pycocoevalcap expects).
    """

    def __init__(
        self,
        corpus: Sequence[Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
        tokenize: Callable[[str], str] | None = simple_tokenize,
    ) -> None:
        if len(corpus) == 0:
            raise ValueError("corpus: CIDEr-D needs at least one image's references")
        self.n, self.sigma = n, sigma
        self.tokenize = tokenize or (lambda s: s)
        self.document_frequency: dict[tuple[str, ...], float] = defaultdict(float)
        for i, refs in enumerate(corpus):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"corpus[{i}]: expected a non-empty list of reference captions")
            grams = set()
            for ref in refs:
                grams.update(_ngrams(self.tokenize(ref), n))
            for g in grams:
                self.document_frequency[g] += 1
        self.log_num_images = math.log(float(len(corpus)))

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> CiderD:
        """Corpus from JSON: `{image: [captions]}` or `[[captions], ...]`."""
        return cls(load_reference_corpus(path), **kwargs)

    def _vec(self, counts: Mapping[tuple[str, ...], int]):
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            df = math.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (self.log_num_images - df)
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # pycocoevalcap counts bigrams as the "length"; kept for exact agreement
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = np.zeros(self.n)
        for k in range(self.n):
            for gram, w in vh[k].items():
                r = vr[k].get(gram, 0.0)
                val[k] += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(delta**2) / (2 * self.sigma**2))
        return val

    def score(self, caption: str, references: Sequence[str]) -> float:
        """CIDEr-D of one caption against its image's references."""
        if len(references) == 0:
            raise ValueError("references: CIDEr-D needs at least one reference caption")
        hyp = self._vec(_ngrams(self.tokenize(caption), self.n))
        total = np.zeros(self.n)
        for ref in references:
            total += self._sim(hyp, self._vec(_ngrams(self.tokenize(ref), self.n)))
        return float(np.mean(total) / len(references) * 10.0)


def load_reference_corpus(path: str | Path) -> list[list[str]]:
    """Read `{image: [captions]}` or `[[captions], ...]` JSON into a list of reference lists."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read reference corpus: {exc}") from exc
    items = data.items() if isinstance(data, dict) else enumerate(data)
    corpus = []
    for key, refs in items:
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{path}: entry {key!r}: expected a non-empty list of caption strings")
        corpus.append(refs)
    if not corpus:
        raise ValueError(f"{path}: reference corpus is empty")
    return corpus


def repetition_fraction(caption: str, n: int = 3) -> float:
    """Fraction of the caption's word n-grams that repeat an earlier one (0 = no repeats)."""
    words = simple_tokenize(caption).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class CaptionRewardConfig:
    """Caption-quality reward: CIDEr-D plus optional anti-degeneration penalties."""

    references_path: str | None = None
    """JSON reference corpus (`{image: [captions]}` or `[[captions], ...]`) fixing CIDEr-D's
    document frequencies; None: the corpus is passed to `build_reward` in code."""
    cider_weight: float = 1.0
    """Weight of CIDEr-D (range about 0-10) inside the caption reward."""
    sigma: float = 6.0
    """CIDEr-D Gaussian length-penalty width (standard: 6)."""
    min_words: int = 0
    """Captions with fewer words are penalized (0 disables)."""
    max_words: int = 0
    """Captions with more words are penalized (0 disables)."""
    length_penalty: float = 0.0
    """Penalty per unit of relative length violation (missing words / min_words, extra / max_words)."""
    repetition_ngram: int = 3
    """n-gram size for the repetition penalty."""
    repetition_penalty: float = 0.0
    """Penalty times the fraction of repeated n-grams (0 disables)."""
    truncation_penalty: float = 0.0
    """Flat penalty for a caption cut at the sampling token limit (`RewardInput.truncated`):
    its last sentence is missing and it is scored as if it were whole otherwise (0 disables;
    DAPO's overlong punishment, without its soft zone)."""

    def __post_init__(self) -> None:
        for name in (
            "min_words",
            "max_words",
            "length_penalty",
            "repetition_penalty",
            "truncation_penalty",
            "cider_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_words and self.min_words > self.max_words:
            raise ValueError(f"min_words: {self.min_words} exceeds max_words {self.max_words}")
        if self.repetition_ngram < 1:
            raise ValueError(f"repetition_ngram: must be >= 1, got {self.repetition_ngram}")
        if self.sigma <= 0:
            raise ValueError(f"sigma: must be > 0, got {self.sigma}")


class CaptionReward:
    """cider_weight·CIDEr-D − length penalty − repetition penalty − truncation penalty, for
    caption tasks.

    CIDEr-D needs the sample's `reference_captions`; a caption-task sample without
    them raises (when cider_weight > 0). Components: "caption", "caption/cider",
    "caption/length_penalty", "caption/repetition_penalty" and, when enabled,
    "caption/truncation_penalty".
    """

    def __init__(
        self,
        cfg: CaptionRewardConfig | None = None,
        corpus: Sequence[Sequence[str]] | None = None,
        caption_tasks: Sequence[str] = CAPTION_TASKS,
    ) -> None:
        self.cfg = cfg or CaptionRewardConfig()
        self.caption_tasks = tuple(caption_tasks)
        self.cider: CiderD | None = None
        if self.cfg.cider_weight > 0:
            if corpus is None:
                if self.cfg.references_path is None:
                    raise ValueError(
                        "references_path: CIDEr-D needs a reference corpus (set the path or pass corpus=)"
                    )
                corpus = load_reference_corpus(self.cfg.references_path)
            self.cider = CiderD(corpus, sigma=self.cfg.sigma)

    def length_penalty(self, caption: str) -> float:
        cfg = self.cfg
        n = len(caption.split())
        short = max(0, cfg.min_words - n) / cfg.min_words if cfg.min_words else 0.0
        long = max(0, n - cfg.max_words) / cfg.max_words if cfg.max_words else 0.0
        return cfg.length_penalty * (short + long)

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        cfg = self.cfg
        B = len(batch)
        cider_B, len_B, rep_B, cut_B = np.zeros(B), np.zeros(B), np.zeros(B), np.zeros(B)
        mask_B = caption_mask_B(batch, self.caption_tasks)
        for i, x in enumerate(batch):
            if not mask_B[i]:
                continue
            if self.cider is not None:
                if not x.reference_captions:
                    raise ValueError(f"sample {i} ({x.image_path}): reference_captions is empty")
                cider_B[i] = self.cider.score(x.completion, x.reference_captions)
            len_B[i] = self.length_penalty(x.completion)
            if cfg.repetition_penalty:
                rep_B[i] = cfg.repetition_penalty * repetition_fraction(
                    x.completion, cfg.repetition_ngram
                )
            cut_B[i] = cfg.truncation_penalty * float(x.truncated)
        reward_B = cfg.cider_weight * cider_B - len_B - rep_B - cut_B
        components = {
            "caption": reward_B.copy(),
            "caption/cider": cider_B,
            "caption/length_penalty": len_B,
            "caption/repetition_penalty": rep_B,
        }
        if cfg.truncation_penalty:
            components["caption/truncation_penalty"] = cut_B
        return RewardOutput(reward_B, components)
