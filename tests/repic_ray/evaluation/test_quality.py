"""Tests for repic_ray/evaluation/quality.py on hand-built captions."""

import pytest

from repic_ray.evaluation.quality import (
    QUALITY_KEYS,
    _meteor_scorer,
    caption_quality,
    close_meteor,
    distinct_n,
    quality_drops,
    repeated_ngram_rate,
    split_quality,
)

REFS = [
    [
        "Bo the red striped cup sits at the top left. The background is plain grey.",
        "At the top left is Bo, a red striped cup. Nothing else is in the image.",
        "There is Bo the red striped cup at the top left.",
    ],
    [
        ("Here you can see two objects. Mia the blue dotted ball lies in the middle. "
        "Kai, my green plain box, stands at the bottom right."),
        "In the middle lies Mia, a blue dotted ball. Kai the green plain box is at the bottom right.",
        ("You can see Mia, the blue dotted ball, in the center. There is Kai the green plain box "
        "at the bottom right."),
    ],
]
GOOD = [
    "There is Bo the red striped cup at the top left. Nothing else is in the image.",
    ("You can see Mia, the blue dotted ball, in the middle. Kai the green plain box stands at "
    "the bottom right."),
]
LOOP = [
    "Bo the cup, Bo the cup, Bo the cup, Bo the cup, Bo the cup, Bo the cup, Bo the cup.",
    ("Here you can see two objects. Mia, two objects. Mia, two objects. Mia, two objects. "
    "Mia, two objects."),
]


@pytest.fixture(scope="module")
def meteor():
    """One METEOR Java process for the module (each start takes seconds)."""
    scorer = _meteor_scorer()
    assert scorer is not None, "METEOR needs Java (installed with the system packages)"
    yield scorer
    close_meteor(scorer)


def test_repeated_ngram_rate_by_hand():
    # "a b c d a b c d": 4-grams abcd, bcda, cdab, dabc, abcd -> 1 of 5 repeats
    assert repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repeated_ngram_rate("a b c") == 0.0  # no 4-gram at all
    assert repeated_ngram_rate("Bo is here. Bo is here. Bo is here.") == pytest.approx(3 / 6)


def test_distinct_n_by_hand():
    # bigrams: (a b) (b a) (a b) | (c d) -> 3 distinct of 4
    assert distinct_n(["a b a b", "c d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0


def test_degenerate_captions_score_badly_on_every_metric(meteor):
    good = caption_quality(GOOD, REFS, at_cap=[False, False], meteor=meteor)
    loop = caption_quality(LOOP, REFS, at_cap=[True, True], meteor=meteor)
    assert set(good) == set(QUALITY_KEYS)
    for key in ("cider_d", "bleu4", "meteor", "rouge_l", "distinct2"):
        assert loop[key] < good[key], key
    assert good["rep4"] == 0.0 and loop["rep4"] > 0.4
    assert good["at_cap"] == 0.0 and loop["at_cap"] == 1.0
    assert good["cider_d"] > 1.0 and loop["cider_d"] < 0.5
    # an empty caption is scored, not crashed on, and scores nothing
    empty = caption_quality(["", ""], REFS, meteor=meteor)
    assert empty["cider_d"] == 0.0 and empty["bleu4"] < 1e-6 and empty["mean_words"] == 0.0
    assert "at_cap" not in empty


def test_a_reference_scores_high_against_the_others(meteor):
    # a caption equal to one of its references is better than a paraphrase with other words
    same = caption_quality([REFS[0][2], REFS[1][2]], REFS, meteor=meteor)
    assert same["bleu4"] > 0.5 and same["rouge_l"] > 0.8


def test_split_quality_pools_every_split(meteor):
    out = split_quality(
        {"k1": ([GOOD[0]], [REFS[0]], [False]), "k2": ([LOOP[1]], [REFS[1]], [True])}, meteor=meteor
    )
    assert set(out) == {"k1", "k2", "pooled"}
    assert out["pooled"]["at_cap"] == 0.5
    assert out["pooled"]["mean_words"] == pytest.approx((out["k1"]["mean_words"] + out["k2"]["mean_words"]) / 2)


def test_quality_drops_names_each_regression():
    before = {"cider_d": 2.0, "rep4": 0.01, "mean_words": 30.0, "at_cap": 0.0}
    assert quality_drops(before, dict(before)) == []
    why = quality_drops(before, {"cider_d": 1.0, "rep4": 0.3, "mean_words": 60.0, "at_cap": 0.5})
    assert len(why) == 4 and why[0].startswith("CIDEr-D")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="nothing to score"):
        caption_quality([], [])
    with pytest.raises(ValueError, match="references"):
        caption_quality(["a"], [[]])
    with pytest.raises(ValueError, match="at_cap"):
        caption_quality(["a"], [["a"]], at_cap=[True, False])


def test_close_meteor_stops_the_process_and_closes_its_pipes():
    scorer = _meteor_scorer()
    assert scorer is not None
    proc = scorer.meteor_p
    close_meteor(scorer)
    assert proc.returncode is not None
    assert proc.stdin.closed and proc.stdout.closed
    del scorer  # pycocoevalcap's own __del__ still runs cleanly after it
    close_meteor(None)  # no Java: nothing to close
