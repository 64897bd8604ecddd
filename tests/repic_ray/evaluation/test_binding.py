"""Tests for repic_ray/evaluation/binding.py: names on their own objects."""

from types import SimpleNamespace

import pytest

from repic_ray.evaluation.binding import binding_counts, pool


def sample(concepts, refs, objects):
    # the fields binding_counts reads of a TrainSample
    return SimpleNamespace(ref_names=refs, concepts=concepts, objects=objects)


BO = {"name": "Bo", "category": "dog", "colour": "red", "box": [0, 0, 4, 4]}
ANYA = {"name": "Anya", "category": "mug", "colour": "blue", "box": [5, 5, 9, 9]}


def test_right_names_on_the_wrong_objects_are_not_bound():
    s = sample(["Bo", "Anya"], ["Bo", "Anya", "Q"], [BO, ANYA])
    good = "Bo the red dog sits at the top. Anya, my blue mug, is at the left."
    swapped = "Bo the blue mug is at the left. Anya the red dog sits at the top."
    repeated = "Bo the red dog sits at the top. Bo the blue mug is at the left."
    out = binding_counts([good, swapped, repeated], [s, s, s])
    assert out["concepts"] == 6 and out["named"] == 5 and out["bound"] == 3
    assert out["bound_rate"] == pytest.approx(0.5)
    assert out["named_bound_rate"] == pytest.approx(0.6)
    assert out["misbound_per_caption"] == pytest.approx(3 / 3)
    assert out["described"] == 0  # no colour-pattern-category phrase (no pattern word) here
    both = pool([binding_counts([good], [s]), binding_counts([swapped], [s])])
    assert both["bound"] == 2 and both["concepts"] == 4 and both["bound_rate"] == pytest.approx(0.5)


def test_samples_without_categories_are_skipped():
    s = sample(["Bo"], ["Bo", "Q"], None)
    assert binding_counts(["Bo the dog."], [s]) is None
    assert pool([]) is None
    with pytest.raises(ValueError, match="differ in length"):
        binding_counts(["a", "b"], [s])


def test_true_descriptions_count_phrases_that_match_a_drawn_object():
    dog = {**BO, "pattern": "striped"}
    mug = {**ANYA, "pattern": "plain"}
    bag = {"name": None, "category": "bag", "colour": "green", "pattern": "dotted", "box": [0, 5, 4, 9]}
    s = sample(["Bo", "Anya"], ["Bo", "Anya"], [dog, mug, bag])
    caption = ("Bo, my red striped dog, sits at the top. The blue striped mug at the left is Anya. "
               "There is also a green dotted bag and two red striped dogs.")
    out = binding_counts([caption], [s])
    # red striped dog (true), blue striped mug (false: the mug is plain), green dotted bag
    # (true), red striped dogs (true, plural)
    assert out["described"] == 4 and out["described_true"] == 3
    assert out["true_descriptions"] == pytest.approx(0.75)
