"""Tests for repic_ray/rewards/caption.py: corpus-fixed CIDEr-D and caption penalties."""

import json

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from repic_ray.rewards.base import RewardInput
from repic_ray.rewards.caption import (
    CaptionReward,
    CaptionRewardConfig,
    CiderD,
    repetition_fraction,
    simple_tokenize,
)

GTS = {
    "a": ["a brown dog runs on the grass", "bo the dog runs across a lawn"],
    "b": ["a cat sleeps on a red sofa", "anya the cat naps on the sofa", "a cat on a sofa"],
    "c": ["two friends play with a ball in the park"],
    "d": ["a dog and a cat sit by the window", "bo and anya by a window"],
}
RES = {
    "a": ["bo the brown dog runs on the grass"],
    "b": ["a cat sleeps on the sofa"],
    "c": ["friends play ball in a park"],
    "d": ["a cat and a dog by the window window"],
}


def test_matches_pycocoevalcap_corpus_mode_exactly():
    _, scores = Cider().compute_score(GTS, RES)
    cider = CiderD(list(GTS.values()), tokenize=None)
    ours = [cider.score(RES[k][0], GTS[k]) for k in GTS]
    np.testing.assert_allclose(ours, scores, rtol=1e-12, atol=0)


def test_per_sample_score_does_not_depend_on_the_batch():
    # pycocoevalcap alone on one image: IDF from one image -> log(1) - log(1) = 0 -> score 0.
    alone, _ = Cider().compute_score({"a": GTS["a"]}, {"a": RES["a"]})
    assert alone == 0.0
    cider = CiderD(list(GTS.values()), tokenize=None)
    assert cider.score(RES["a"][0], GTS["a"]) > 0.0


def test_reward_tokenizes_and_penalizes():
    cider = CiderD(list(GTS.values()))
    # simple_tokenize lower-cases and drops punctuation, so these score like the plain form.
    assert simple_tokenize("Bo, the brown Dog!") == "bo the brown dog"
    assert cider.score("Bo the brown dog runs on the grass.", GTS["a"]) == pytest.approx(
        CiderD(list(GTS.values()), tokenize=None).score(RES["a"][0], GTS["a"])
    )
    cfg = CaptionRewardConfig(min_words=4, max_words=8, length_penalty=1.0, repetition_penalty=2.0)
    reward = CaptionReward(cfg, corpus=list(GTS.values()))
    batch = [
        RewardInput("dog", reference_captions=GTS["a"]),
        RewardInput("the dog the dog the dog the dog the dog", reference_captions=GTS["a"]),
        RewardInput("dog", task="yes_no", solution="yes"),
    ]
    out = reward(batch)
    # "dog": 1 word, min 4 -> (4-1)/4 = 0.75 length penalty; no trigrams -> no repetition.
    # 10 words, max 8 -> (10-8)/8 = 0.25; trigrams: 8, distinct {the dog the, dog the dog} = 2
    # -> repeated fraction 1 - 2/8 = 0.75, times 2.0 = 1.5.
    np.testing.assert_allclose(out.components["caption/length_penalty"], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(out.components["caption/repetition_penalty"], [0.0, 1.5, 0.0])
    cider_B = out.components["caption/cider"]
    np.testing.assert_allclose(out.rewards_B, cider_B - [0.75, 1.75, 0.0])
    assert cider_B[2] == 0.0  # not a caption task
    assert repetition_fraction("a b c d") == 0.0
    assert "caption/truncation_penalty" not in out.components  # off unless set


def test_truncation_penalty_applies_to_captions_cut_at_the_token_limit():
    cfg = CaptionRewardConfig(cider_weight=0.0, truncation_penalty=0.5)
    out = CaptionReward(cfg)([
        RewardInput("Bo the brown dog runs on", truncated=True),
        RewardInput("Bo the brown dog runs on the grass."),
        RewardInput("yes", task="yes_no", solution="yes", truncated=True),
    ])
    np.testing.assert_allclose(out.components["caption/truncation_penalty"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(out.rewards_B, [-0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="truncation_penalty"):
        CaptionRewardConfig(truncation_penalty=-1.0)


def test_corpus_from_file_and_errors(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(GTS))
    reward = CaptionReward(CaptionRewardConfig(references_path=str(path)))
    ref = CiderD(list(GTS.values()))
    out = reward([RewardInput(RES["b"][0], reference_captions=GTS["b"])])
    np.testing.assert_allclose(out.rewards_B, [ref.score(RES["b"][0], GTS["b"])])
    with pytest.raises(ValueError, match="reference_captions is empty"):
        reward([RewardInput("a cat")])
    with pytest.raises(ValueError, match="references_path"):
        CaptionReward(CaptionRewardConfig())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": []}))
    with pytest.raises(ValueError, match="bad.json: entry 'x'"):
        CaptionReward(CaptionRewardConfig(references_path=str(bad)))
