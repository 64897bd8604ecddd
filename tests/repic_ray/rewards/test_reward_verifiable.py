"""Tests for repic_ray/rewards/verifiable.py: RePIC's verifiable rewards, hand-derived cases."""

import numpy as np
import pytest

from repic_ray.rewards.base import RewardInput
from repic_ray.rewards.verifiable import (
    VerifiableConfig,
    VerifiableReward,
    box_iou,
    iou_reward,
    parse_first_box,
    yes_no_name_multi_reward,
    yes_no_name_reward,
    yes_no_reward,
)

PAD = " and the scene around is a sunny park with green trees and a long bench." * 2  # 144 chars


def test_yes_no_first_substring_wins():
    assert yes_no_reward("Yes, it is.", "yes") == 1.0
    assert yes_no_reward("No.", "yes") == 0.0
    # RePIC searches substrings: "I know" -> first match "no" (inside "know").
    assert yes_no_reward("I know, yes", "no") == 1.0
    assert yes_no_reward("maybe", "yes") == 0.0


def test_box_iou_repic_formula():
    # Same box [0,0,10,10]: inter x in [0, 9] -> (9-0+1)^2 = 100; areas 10*10 = 100 each;
    # union = 100 + 100 - 100 = 100 -> IoU 1.0.
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # [0,0,10,10] vs [5,0,15,10]: inter x1=5, x2=min(9,14)=9 -> 5 wide; y 0..9 -> 10 tall: 50;
    # union = 100 + 100 - 50 = 150 -> 1/3.
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    # Disjoint boxes: 0.
    assert box_iou([0, 0, 5, 5], [6, 6, 9, 9]) == 0.0


def test_iou_reward_parses_first_box_in_json():
    out = (
        '```json\n[{"bbox_2d": [0, 0, 10, 10], "label": "Bo"}, {"bbox_2d": [50, 50, 60, 60]}]\n```'
    )
    assert parse_first_box(out) == [0, 0, 10, 10]
    assert iou_reward(out, [0, 0, 10, 10]) == 1.0
    # [2,0,10,10] vs gt [0,0,10,10]: inter x 2..9 = 8 wide, 10 tall = 80; union = 80+100-80 = 100
    # -> 0.8 >= 0.5.
    assert iou_reward("[2, 0, 10, 10]", [0, 0, 10, 10]) == 1.0
    # 1/3 < 0.5 (see above).
    assert iou_reward("box: [5,0,15,10]", [0, 0, 10, 10]) == 0.0
    assert iou_reward("no box here", [0, 0, 10, 10]) == 0.0
    assert parse_first_box("[1.5, 2, 30.25, 40]") == [1.5, 2, 30.25, 40]


def test_yes_no_name_length_rule_and_closing_tag_guard():
    short = "<Bo> plays."
    long = "<Bo> plays" + PAD
    assert len(short) < 100 <= len(long)
    assert yes_no_name_reward(short, "<Bo>") == 0.0  # shorter than 100 characters
    assert yes_no_name_reward(long, "<Bo>") == 1.0
    assert yes_no_name_reward(long + " </Bo>", "<Bo>") == 0.0  # closing tag: hacking guard
    assert yes_no_name_reward(long, "<bo>") == 0.0  # case-sensitive substring
    # Guard only for answers that start with "<".
    assert yes_no_name_reward("Bo plays" + PAD + "</Bo>", "Bo") == 1.0


def test_yes_no_name_multi_fraction_without_guard():
    text = "<Bo> and <Anya> play" + PAD + " </Bo>"
    # 2 of 3 names found -> 2/3; RePIC applies no closing-tag guard in the multi reward.
    assert yes_no_name_multi_reward(text, ["<Bo>", "<Anya>", "<Q>"]) == pytest.approx(2 / 3)
    # With the optional guard <Bo> no longer counts -> 1/3.
    assert yes_no_name_multi_reward(
        text, ["<Bo>", "<Anya>", "<Q>"], closing_tag_guard=True
    ) == pytest.approx(1 / 3)
    assert yes_no_name_multi_reward("<Bo> <Anya>", ["<Bo>", "<Anya>"]) == 0.0  # too short


def test_batched_reward_dispatches_by_task():
    long = "<Bo> plays" + PAD
    batch = [
        RewardInput("yes", task="yes_no", solution="yes"),
        RewardInput('{"bbox_2d": [0, 0, 10, 10]}', task="iou", solution="[0, 0, 10, 10]"),
        RewardInput(long, task="yes_no_name", solution="<Bo>"),
        RewardInput(long, task="yes_no_name_multi", solution=["<Bo>", "<Anya>"]),
        RewardInput(long, task="caption"),
    ]
    out = VerifiableReward()(batch)
    np.testing.assert_array_equal(out.rewards_B, [1.0, 1.0, 1.0, 0.5, 0.0])
    np.testing.assert_array_equal(out.components["verifiable"], out.rewards_B)


def test_min_chars_is_configurable():
    out = VerifiableReward(VerifiableConfig(min_caption_chars=5))(
        [RewardInput("<Bo> plays.", task="yes_no_name", solution="<Bo>")]
    )
    assert out.rewards_B.tolist() == [1.0]


def test_bad_solutions_raise_naming_the_sample():
    with pytest.raises(ValueError, match="sample 1: iou solution"):
        VerifiableReward()(
            [
                RewardInput("yes", task="yes_no", solution="yes"),
                RewardInput("[1,2,3,4]", task="iou", solution=[1, 2]),
            ]
        )
    with pytest.raises(ValueError, match="task"):
        RewardInput("x", task="vqa")
    with pytest.raises(ValueError, match="iou_threshold"):
        VerifiableConfig(iou_threshold=1.5)
