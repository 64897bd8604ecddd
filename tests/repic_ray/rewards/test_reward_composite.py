"""Tests for repic_ray/rewards/composite.py: weights, components, per-task applicability."""

import numpy as np
import pytest

from repic_ray.rewards import RewardConfig, RewardInput, build_reward
from repic_ray.rewards.caption import CaptionRewardConfig, CiderD

PAD = " and the scene around is a sunny park with green trees and a long bench." * 2
REFS = ["<Bo>", "<Anya>"]
CORPUS = [["bo the dog runs on the grass"], ["a cat sleeps on a sofa", "anya naps"]]


def _batch():
    return [
        RewardInput("yes", task="yes_no", solution="yes", candidate_names=REFS),
        RewardInput(
            "<Bo> runs" + PAD,
            task="yes_no_name",
            solution="<Bo>",
            concept_names=["<Bo>"],
            candidate_names=REFS,
            reference_captions=CORPUS[0],
        ),
        RewardInput(
            "<Bo> and <Anya> run" + PAD,
            task="yes_no_name",
            solution="<Bo>",
            concept_names=["<Bo>"],
            candidate_names=REFS,
            reference_captions=CORPUS[0],
        ),
    ]


def test_weights_and_components():
    cfg = RewardConfig(verifiable_weight=2.0, name_weight=0.5, caption_weight=0.1)
    reward = build_reward(cfg, reference_corpus=CORPUS)
    assert reward.names == ["verifiable", "name", "caption"]
    out = reward(_batch())
    comp = out.components
    # verifiable: yes==yes -> 1; "<Bo>" present, long enough, no "</Bo>" -> 1 and 1.
    np.testing.assert_allclose(comp["verifiable"], [1.0, 1.0, 1.0])
    # name F1: yes_no task -> 0 (not a caption task); Bo only -> 1; Bo + wrong Anya:
    # P 1/2, R 1 -> F1 2/3.
    np.testing.assert_allclose(comp["name"], [0.0, 1.0, 2 / 3])
    cider = CiderD(CORPUS)
    expected_caption = [0.0] + [cider.score(x.completion, CORPUS[0]) for x in _batch()[1:]]
    np.testing.assert_allclose(comp["caption"], expected_caption)
    np.testing.assert_allclose(comp["caption/cider"], expected_caption)
    np.testing.assert_allclose(
        out.rewards_B, 2.0 * comp["verifiable"] + 0.5 * comp["name"] + 0.1 * comp["caption"]
    )
    assert {"name/precision", "name/recall", "name/wrong", "caption/length_penalty"} <= set(comp)
    assert out.means()["reward"] == pytest.approx(float(out.rewards_B.mean()))


def test_zero_weight_components_are_not_built():
    # caption_weight 0: no corpus needed; detector_weight 0: no detector loaded.
    reward = build_reward(RewardConfig(name_weight=1.0))
    assert reward.names == ["verifiable", "name"]
    with pytest.raises(ValueError, match="every weight is 0"):
        build_reward(RewardConfig(verifiable_weight=0.0))
    with pytest.raises(ValueError, match="references_path"):
        build_reward(RewardConfig(caption_weight=1.0, caption=CaptionRewardConfig()))


def test_config_validation():
    with pytest.raises(ValueError, match="name_weight"):
        RewardConfig(name_weight=-1.0)
    with pytest.raises(ValueError, match="caption_tasks"):
        RewardConfig(caption_tasks=["vqa"])
