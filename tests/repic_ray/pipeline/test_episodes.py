"""Reward inputs built from a training sample and its completions."""

from __future__ import annotations

import pytest

from repic_ray.data.formats import DataError, TrainSample
from repic_ray.pipeline.episodes import check_categories, reward_inputs
from repic_ray.rollout.types import Completion


def test_reward_inputs_carry_names_categories_references_and_truncation():
    sample = TrainSample(
        images=["bo_0.png", "mia_0.png", "bo_1.png", "query.png"], problem="Describe the image.", solution="Bo",
        accu_reward_method="yes_no_name", ref_names=["Bo", "Mia", "Bo"], concepts=["Bo"],
        reference_captions=["Bo the brown dog sits at the left."],
        objects=[{"name": "Bo", "category": "dog", "box": [0, 0, 10, 10]},
                 {"name": None, "category": "mug", "box": [20, 0, 30, 10]}],
    )
    done = Completion("Bo the brown dog sits at the left.", [1, 2], [-0.1, -0.2], "stop", 3)
    cut = Completion("Bo the brown dog sits at", [1, 2], [-0.1, -0.2], "length", 3)
    first, second = reward_inputs(sample, [done, cut], {"Mia": "mug"})
    assert first.candidate_names == ["Bo", "Mia"]  # a name shown with several photos counts once
    assert first.concept_names == ["Bo"] and first.categories == {"Bo": "dog", "Mia": "mug"}
    assert first.reference_captions == ["Bo the brown dog sits at the left."]
    assert first.image_path == sample.query_image
    assert (first.truncated, second.truncated) == (False, True)
    # the drawn objects' attributes, for the description reward (no boxes)
    assert first.objects == [{"name": "Bo", "category": "dog"}, {"category": "mug"}]


def _caption_sample(**kw):
    return TrainSample(
        images=["bo.png", "kiki.png", "query.png"], problem="Describe the image.", solution=["Bo"],
        accu_reward_method="yes_no_name_multi", ref_names=["Bo", "Kiki"], concepts=["Bo"],
        objects=[{"name": "Bo", "category": "dog", "box": [0, 0, 10, 10]}], **kw,
    )


def test_absent_reference_gets_its_category_from_the_sample():
    (x,) = reward_inputs(_caption_sample(ref_categories=["dog", "hat"]),
                         [Completion("Kiki the hat.", [1], [-0.1], "stop", 1)], {})
    assert x.categories == {"Bo": "dog", "Kiki": "hat"}


def test_check_categories_names_the_sample_and_the_name_before_a_run():
    check_categories([_caption_sample(ref_categories=["dog", "hat"])], {}, ("yes_no_name_multi",))
    check_categories([_caption_sample()], {"kiki": "hat"}, ("yes_no_name_multi",))  # name_key match
    check_categories([_caption_sample()], {}, ("caption",))  # not a task the detector scores
    with pytest.raises(ValueError, match=r"no category for 'Kiki'.*ref_categories"):
        check_categories([_caption_sample()], {}, ("yes_no_name_multi",))


def test_ref_categories_must_match_the_references():
    with pytest.raises(DataError, match="ref_categories.*1 categories for 2 reference images"):
        _caption_sample(ref_categories=["dog"])
    with pytest.raises(DataError, match="ref_categories"):
        _caption_sample(ref_categories=["dog", ""])


def test_database_categories_match_names_as_the_detector_does():
    """A database keyed "<Kiki>" gives "Kiki" its category in the reward inputs, so the check
    before a run and the detector reward agree on which names have one."""
    (x,) = reward_inputs(_caption_sample(), [Completion("Kiki.", [1], [-0.1], "stop", 1)], {"<Kiki>": "hat"})
    assert x.categories == {"Bo": "dog", "Kiki": "hat"}
    check_categories([_caption_sample()], {"<Kiki>": "hat"}, ("yes_no_name_multi",))
