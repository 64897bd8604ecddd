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
    both = pool([binding_counts([good], [s]), binding_counts([swapped], [s])])
    assert both["bound"] == 2 and both["concepts"] == 4 and both["bound_rate"] == pytest.approx(0.5)


def test_samples_without_categories_are_skipped():
    s = sample(["Bo"], ["Bo", "Q"], None)
    assert binding_counts(["Bo the dog."], [s]) is None
    assert pool([]) is None
    with pytest.raises(ValueError, match="differ in length"):
        binding_counts(["a", "b"], [s])
