"""Tests for repic_ray/rewards/description.py: true attribute phrases, names bound to them."""

import numpy as np
import pytest

from repic_ray.rewards import RewardConfig, build_reward
from repic_ray.rewards.base import RewardInput
from repic_ray.rewards.description import (
    DescriptionReward,
    DescriptionRewardConfig,
    description_scores,
    phrases,
)

OBJECTS = [
    {"name": "Bo", "colour": "red", "pattern": "dotted", "category": "dog"},
    {"name": "Mia", "colour": "blue", "pattern": "plain", "category": "mug"},
    {"colour": "green", "pattern": "striped", "category": "car"},  # not a concept
]
PRESENT, REFS = ["Bo", "Mia"], ["Bo", "Mia", "Zed"]


def _x(caption, task="caption", objects=OBJECTS):
    return RewardInput(caption, task=task, concept_names=PRESENT, candidate_names=REFS,
                       objects=objects)


def test_phrases_are_the_worlds_attribute_triples():
    assert phrases("Bo the Red dotted dogs. A blue plain thing. A green striped car.") == [
        ("red", "dotted", "dog"), ("green", "striped", "car")]


def test_each_name_is_bound_only_by_its_own_objects_description():
    # name first and object first both bind; the description is cut at the next name
    assert description_scores(
        "Bo the red dotted dog sits at the top. The blue plain mug at the left is Mia.",
        PRESENT, REFS, OBJECTS) == (2, 2, 2, 2)
    # the right names on each other's objects: every phrase true, no name bound
    assert description_scores(
        "Bo the blue plain mug sits at the top. Mia the red dotted dog is at the left.",
        PRESENT, REFS, OBJECTS) == (2, 2, 0, 2)
    # an absent reference's name does not bind, and Bo's description stops at "Zed"
    assert description_scores(
        "Bo sits beside Zed the red dotted dog.", PRESENT, REFS, OBJECTS) == (1, 1, 0, 2)


def test_hand_values_and_degenerate_captions_score_badly():
    out = DescriptionReward()([
        # all true, both bound: truth 1 + bound 1
        _x("Bo the red dotted dog sits at the top. Mia, my blue plain mug, is at the left. "
           "A green striped car lies at the bottom."),
        # one name repeated on invented objects: truth -1, bound 0
        _x("Bo the yellow checkered shoe sits at the top. Bo the yellow checkered shoe sits."),
        # half the phrases false, Bo bound: truth 0, bound 1/2
        _x("Bo the red dotted dog sits at the top. A pink striped hat is at the left."),
        # no phrase at all: 0
        _x("Bo and Mia."),
        # not a caption task, or the objects unknown: 0
        _x("Bo the red dotted dog.", task="yes_no"),
        _x("Bo the red dotted dog.", objects=[]),
    ])
    np.testing.assert_allclose(out.rewards_B, [2.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(out.components["description/bound"], [1, 0, 0.5, 0, 0, 0])
    np.testing.assert_allclose(out.components["description/phrases"], [3, 2, 2, 0, 0, 0])


def test_weights_and_the_composite():
    x = _x("Bo the red dotted dog sits. A pink striped hat is at the left.")
    only_bound = DescriptionReward(DescriptionRewardConfig(truth_weight=0.0))([x])
    assert only_bound.rewards_B.tolist() == [0.5]
    total = build_reward(RewardConfig(verifiable_weight=0, name_weight=1.0,
                                      description_weight=0.5))([x])
    # names (F1): precision 1, recall 1/2 -> 2/3; description 0 + 0.5, weighted 0.5
    np.testing.assert_allclose(total.rewards_B, [2 / 3 + 0.5 * 0.5])
    assert total.components["description/bound"].tolist() == [0.5]


def test_config_and_input_validation():
    with pytest.raises(ValueError, match="bound_weight"):
        DescriptionRewardConfig(bound_weight=-1)
    with pytest.raises(ValueError, match="description_weight"):
        RewardConfig(description_weight=-0.1)
    with pytest.raises(ValueError, match="objects"):
        RewardInput("Bo", objects=["a red dog"])
