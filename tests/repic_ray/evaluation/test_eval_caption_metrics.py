"""Tests for repic_ray/evaluation/caption_metrics.py: pycocoevalcap metrics offline (Java)."""

import pytest

from repic_ray.evaluation.caption_metrics import caption_metrics, spice_unavailable_reason


def test_metrics_offline_and_spice_reported():
    refs = {
        "0": ["a brown dog runs across the green grass", "the dog is running on a lawn"],
        "1": ["a black cat sleeps on the red sofa"],
    }
    # Both captions equal a reference (after PTB tokenization: lower case, no period).
    caps = {
        "0": "A brown dog runs across the green grass.",
        "1": "A black cat sleeps on the red sofa.",
    }
    out = caption_metrics(caps, refs)
    # Every n-gram of each caption appears in a reference and lengths match a reference
    # exactly (brevity penalty 1) -> BLEU-4 = 1; the LCS is the whole caption -> ROUGE-L = 1.
    assert out.scores["BLEU-4"] == pytest.approx(1.0)
    assert out.scores["ROUGE-L"] == pytest.approx(1.0)
    assert 0.5 < out.scores["METEOR"] <= 1.0
    assert out.scores["CIDEr"] > 0.0
    if spice_unavailable_reason() is not None:
        assert "SPICE" not in out.scores
        assert "CoreNLP" in out.unavailable["SPICE"]
    with pytest.raises(ValueError, match="no reference caption for '1'"):
        caption_metrics(caps, {"0": refs["0"]}, spice=False)
