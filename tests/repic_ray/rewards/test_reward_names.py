"""Tests for repic_ray/rewards/names.py: name precision / recall reward."""

import numpy as np
import pytest

from repic_ray.rewards.base import RewardInput
from repic_ray.rewards.names import NameReward, NameRewardConfig

REFS = ["<Bo>", "<Anya>", "<Q>"]


def _x(caption, concepts, task="caption"):
    return RewardInput(caption, task=task, concept_names=concepts, candidate_names=REFS)


def test_f1_reward_hand_values():
    batch = [
        # 1 concept named right, nothing else: P = 1, R = 1 -> F1 = 1.
        _x("Bo's ball.", ["<Bo>"]),
        # Every reference named, 1 concept: P = 1/3, R = 1 -> F1 = 2*(1/3)/(4/3) = 0.5.
        _x("Bo, Anya and Q.", ["<Bo>"]),
        # 2 concepts, 1 found, none wrong: P = 1, R = 1/2 -> F1 = 2*0.5/1.5 = 2/3.
        _x("Anya smiles.", ["<Bo>", "<Anya>"]),
        # Only a wrong name: P = 0, R = 0 -> 0.
        _x("Q smiles.", ["<Bo>"]),
        # Non-caption task -> 0 whatever the text.
        _x("Bo", ["<Bo>"], task="yes_no"),
    ]
    out = NameReward()(batch)
    np.testing.assert_allclose(out.rewards_B, [1.0, 0.5, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(out.components["name/precision"], [1.0, 1 / 3, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(out.components["name/recall"], [1.0, 1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(out.components["name/wrong"], [0, 2, 0, 1, 0])


def test_recall_minus_wrong_naming_everyone_does_not_pay():
    cfg = NameRewardConfig(mode="recall_minus_wrong", wrong_penalty=1.0)
    batch = [
        _x("Bo plays.", ["<Bo>"]),
        _x("Bo, Anya and Q play.", ["<Bo>"]),
        _x("A dog.", ["<Bo>"]),
    ]
    out = NameReward(cfg)(batch)
    # right only: 1 - 0 = 1; all three: 1 - 1*2/1 = -1; nothing: 0 - 0 = 0.
    np.testing.assert_allclose(out.rewards_B, [1.0, -1.0, 0.0])
    # With lambda = 0.5: all three -> 1 - 0.5*2 = 0.
    out = NameReward(NameRewardConfig(mode="recall_minus_wrong", wrong_penalty=0.5))(batch[1:2])
    np.testing.assert_allclose(out.rewards_B, [0.0])


def test_repeat_penalty_charges_a_name_used_for_two_objects():
    cfg = NameRewardConfig(mode="recall_minus_wrong", wrong_penalty=2.0, repeat_penalty=2.0)
    batch = [
        # Both concepts named once: 1.
        _x("Bo the red car. Anya the blue mug.", ["<Bo>", "<Anya>"]),
        # Bo named for both objects: recall 1/2, one repeat -> 0.5 - 2 * 1 / 2 = -0.5.
        _x("Bo the red car. Bo the blue mug.", ["<Bo>", "<Anya>"]),
        # Three mentions of Bo and one of Q (wrong): 0.5 - 2 * 1 / 2 - 2 * 2 / 2 = -2.5.
        _x("Bo, bo and <Bo>. Q.", ["<Bo>", "<Anya>"]),
        # The second object left unnamed: 0.5, better than repeating.
        _x("Bo the red car. A blue mug.", ["<Bo>", "<Anya>"]),
    ]
    out = NameReward(cfg)(batch)
    np.testing.assert_allclose(out.rewards_B, [1.0, -0.5, -2.5, 0.5])
    np.testing.assert_allclose(out.components["name/repeats"], [0, 1, 2, 0])
    # Off by default: the repeat costs nothing and the recall alone is paid.
    out = NameReward(NameRewardConfig(mode="recall_minus_wrong"))(batch[1:2])
    np.testing.assert_allclose(out.rewards_B, [0.5])
    np.testing.assert_allclose(out.components["name/repeats"], [1])


def test_compat_match_mode_misses_possessive():
    cfg = NameRewardConfig(match_mode="compat")
    out = NameReward(cfg)([_x("Bo's ball.", ["<Bo>"])])
    np.testing.assert_allclose(out.rewards_B, [0.0])


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        NameRewardConfig(mode="precision")
    with pytest.raises(ValueError, match="repeat_penalty"):
        NameRewardConfig(repeat_penalty=-1.0)
    with pytest.raises(ValueError, match="wrong_penalty"):
        NameRewardConfig(wrong_penalty=-1)


def test_recall_agrees_with_the_evaluation_metric():
    # Reward and metric share the matcher: per caption, the reward's recall equals the
    # metric's hits / slots with the same candidates.
    from repic_ray.evaluation.metric import evaluate_names

    rows = [
        ("Bo's ball.", ["<Bo>"]),
        ("Captain America, <anya>.", ["<Anya>", "<Bo>"]),
        ("Q alone.", ["<Q>", "<Bo>"]),
        ("Nobody here.", ["<Bo>"]),
    ]
    out = NameReward()([_x(c, g) for c, g in rows])
    for (caption, gt), recall in zip(rows, out.components["name/recall"]):
        assert evaluate_names([caption], [gt], candidates=REFS).overall.recall == recall


def test_category_grounding_rewards_only_names_bound_to_their_own_object():
    cfg = NameRewardConfig(mode="recall_minus_wrong", grounding="category")
    cats = {"<Bo>": "dog", "<Anya>": "mug"}

    def x(caption):
        return RewardInput(caption, concept_names=["<Bo>", "<Anya>"], candidate_names=REFS,
                           categories=cats)

    batch = [
        # Both named, each followed by its own category: full recall.
        x("Bo the red dog sits at the top. You can see Anya, the blue mug, at the left."),
        # Bo's name used on the mug and Anya's never written: Bo still grounded by its dog.
        x("Bo the red dog sits at the top. Bo the blue mug is at the left."),
        # Both names, swapped onto each other's objects: nothing grounded, two misbound.
        x("Bo the blue mug is at the left. Anya, the red dog, sits at the top."),
        # The category in the next sentence does not ground the name.
        x("Here is Bo. A red dog sits at the top. Anya the blue mug is at the left."),
        # Plural category and a possessive still count.
        x("Anya's mugs are blue; Bo the dogs."),
    ]
    out = NameReward(cfg)(batch)
    np.testing.assert_allclose(out.components["name/recall"], [1.0, 0.5, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(out.components["name/misbound"], [0, 1, 2, 0, 0])
    plain = NameReward(NameRewardConfig(mode="recall_minus_wrong"))(batch)
    np.testing.assert_allclose(plain.components["name/recall"], [1.0, 0.5, 1.0, 1.0, 1.0])
    assert "name/misbound" not in plain.components


def test_category_grounding_falls_back_to_plain_match_without_a_category():
    cfg = NameRewardConfig(grounding="category")
    x = RewardInput("Bo smiles.", concept_names=["<Bo>"], candidate_names=REFS)
    assert NameReward(cfg)([x]).rewards_B[0] == 1.0
    with pytest.raises(ValueError, match="grounding"):
        NameRewardConfig(grounding="colour")
    with pytest.raises(ValueError, match="match_mode"):
        NameRewardConfig(grounding="category", match_mode="compat")


def test_category_grounding_reads_the_description_before_the_name_too():
    cfg = NameRewardConfig(grounding="category")
    cats = {"<Bo>": "dog", "<Anya>": "mug"}
    x = RewardInput("The red dog at the top is Bo. A blue mug lies at the left; it is Anya.",
                    concept_names=["<Bo>", "<Anya>"], candidate_names=REFS, categories=cats)
    wrong = RewardInput("The red dog at the top is Anya. A blue mug lies at the left; it is Bo.",
                        concept_names=["<Bo>", "<Anya>"], candidate_names=REFS, categories=cats)
    out = NameReward(cfg)([x, wrong])
    np.testing.assert_allclose(out.components["name/recall"], [1.0, 0.0])
    np.testing.assert_allclose(out.components["name/misbound"], [0, 2])
