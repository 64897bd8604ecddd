"""Standard caption metrics with pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr(-D).

Captions and references go through pycocoevalcap's PTBTokenizer (Java; works
offline). METEOR also runs Java. SPICE needs Stanford CoreNLP, which
pycocoevalcap downloads on first use; without it SPICE is reported as
unavailable, with the reason, instead of failing the evaluation.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from repic_ray.evaluation.quality import close_meteor

SPICE_CORENLP_JAR = "stanford-corenlp-3.6.0.jar"


@dataclass
class CaptionMetrics:
    """Corpus-level caption scores; `unavailable` maps a metric name to why it was not computed."""

    scores: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"scores": dict(self.scores), "unavailable": dict(self.unavailable)}


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when its CoreNLP jar is installed."""
    from pycocoevalcap.spice import spice

    lib = os.path.join(os.path.dirname(spice.__file__), "lib", SPICE_CORENLP_JAR)
    if not os.path.exists(lib):
        return (
            f"SPICE needs {SPICE_CORENLP_JAR} (Stanford CoreNLP), which pycocoevalcap downloads "
            "from nlp.stanford.edu on first use; it is not installed and cannot be fetched offline"
        )
    return None


def caption_metrics(
    captions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    spice: bool = True,
) -> CaptionMetrics:
    """Score captions (id -> caption) against references (id -> list of captions).

    Every caption id needs at least one reference; a missing one raises naming the id.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not captions:
        raise ValueError("captions: nothing to score")
    for key in captions:
        refs = references.get(key)
        if not refs:
            raise ValueError(f"references: no reference caption for {key!r}")
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in captions.items()})
    gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in captions})
    out = CaptionMetrics()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.scores["BLEU-4"] = float(bleu[3])
    meteor = Meteor()  # a Java subprocess
    try:
        out.scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        close_meteor(meteor)
    out.scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out.scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        reason = spice_unavailable_reason()
        if reason is None:
            try:
                from pycocoevalcap.spice.spice import Spice

                out.scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
                out.unavailable["SPICE"] = f"SPICE failed: {exc}"
        else:
            out.unavailable["SPICE"] = reason
    return out
