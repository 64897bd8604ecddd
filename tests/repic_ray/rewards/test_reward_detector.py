"""Tests for repic_ray/rewards/detector.py with a real tiny random Grounding DINO."""

import numpy as np
import pytest
from PIL import Image

from repic_ray.rewards.base import RewardInput
from repic_ray.rewards.detector import DetectorReward, DetectorRewardConfig, unpack_detector

REFS = ["<Bo>", "<Anya>"]
CATS = {"<Bo>": "dog", "<Anya>": "cat"}


@pytest.fixture(scope="module")
def detector():
    from repic_ray.models.loading import load_detector

    return load_detector("tiny:grounding-dino")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "query.png"
    Image.new("RGB", (40, 30), (180, 120, 60)).save(path)
    return str(path)


def _batch(image):
    def x(caption, task="caption"):
        return RewardInput(
            caption,
            task=task,
            solution="yes" if task == "yes_no" else None,
            image_path=image,
            concept_names=["<Bo>"],
            candidate_names=REFS,
            categories=CATS,
        )

    return [x("Bo runs."), x("Bo and Anya play."), x("A dog."), x("Bo", task="yes_no")]


def _reward(detector, box, text):
    model, processor = unpack_detector(detector)
    cfg = DetectorRewardConfig(box_threshold=box, text_threshold=text)
    return DetectorReward(cfg, model=model, processor=processor)


def test_threshold_zero_every_named_entity_is_present(detector, image):
    reward = _reward(detector, 0.0, 0.0)
    calls = []
    handle = reward.model.register_forward_hook(lambda *a: calls.append(1))
    out = reward(_batch(image))
    handle.remove()
    # Two distinct (image, category) pairs (dog, cat) -> one batched forward pass.
    assert len(calls) == 1
    # Everything named is verified: recall of {Bo}: 1, 1, 0 (nothing named), 0 (yes_no task);
    # nothing hallucinated.
    np.testing.assert_allclose(out.components["detector/recall"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(out.components["detector/hallucinated"], [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(out.rewards_B, [1.0, 1.0, 0.0, 0.0])


def test_threshold_above_one_nothing_is_present(detector, image):
    out = _reward(detector, 1.5, 1.5)(_batch(image))
    # Sigmoid scores are < 1: nothing verified. Recall 0; hallucinated fraction of named:
    # 1/1, 2/2, 0 (none named), 0 -> reward = 0 - 1 * that.
    np.testing.assert_allclose(out.components["detector/hallucinated"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(out.rewards_B, [-1.0, -1.0, 0.0, 0.0])


def test_name_whose_entity_is_absent_is_penalized(detector, image):
    reward = _reward(detector, 0.0, 0.0)
    scores = reward.detect([(image, "dog"), (image, "cat")])
    assert scores[(image, "dog")] != scores[(image, "cat")]
    # A text threshold between the two scores makes exactly one category "absent".
    reward.cfg.text_threshold = (scores[(image, "dog")] + scores[(image, "cat")]) / 2
    out = reward(_batch(image))
    if scores[(image, "dog")] > scores[(image, "cat")]:
        # Bo (dog) verified, Anya (cat) hallucinated: sample 2 -> recall 1, halluc 1/2 -> 0.5.
        np.testing.assert_allclose(out.rewards_B, [1.0, 0.5, 0.0, 0.0])
    else:
        # Bo (dog) not found: sample 1 -> 0 - 1 = -1; sample 2: Anya verified but not in
        # the image's concepts -> recall 0, halluc 1/2 -> -0.5.
        np.testing.assert_allclose(out.rewards_B, [-1.0, -0.5, 0.0, 0.0])


def test_missing_category_raises(detector, image):
    x = RewardInput("Bo runs.", image_path=image, concept_names=["<Bo>"], categories={})
    with pytest.raises(ValueError, match="categories has no entry for concept '<Bo>'"):
        _reward(detector, 0.0, 0.0)([x])


def test_build_reward_with_loaded_detector(detector, image):
    from repic_ray.rewards import RewardConfig, build_reward

    cfg = RewardConfig(verifiable_weight=0.0, detector_weight=2.0)
    cfg.detector.box_threshold = cfg.detector.text_threshold = 0.0
    reward = build_reward(cfg, detector=detector)
    out = reward(_batch(image))
    # Thresholds 0: detector rewards 1, 1, 0, 0 (first test), times weight 2.
    np.testing.assert_allclose(out.rewards_B, [2.0, 2.0, 0.0, 0.0])
    np.testing.assert_allclose(out.components["detector/recall"], [1.0, 1.0, 0.0, 0.0])


def test_open_world_caption_naming_an_absent_reference_is_scored(detector, tmp_path):
    """Per-episode names: an absent reference has no drawn object, its category comes from
    the sample's `ref_categories` (a caption that names it once stopped the run)."""
    from repic_ray.data.formats import load_samples
    from repic_ray.data.synthetic import generate_world
    from repic_ray.pipeline.episodes import reward_inputs
    from repic_ray.rollout.types import Completion

    world = generate_world(tmp_path / "w", seed=3, names="open", num_concepts=20,
                           num_train=24, num_sft=0, num_eval_per_k=1)
    sample = next(s for s in load_samples(world.train)
                  if s.accu_reward_method == "yes_no_name_multi" and set(s.ref_names) - set(s.concepts))
    absent = sorted(set(sample.ref_names) - set(sample.concepts))
    caption = " and ".join([*sample.concepts, *absent]) + " are here."
    inputs = reward_inputs(sample, [Completion(caption, [1], [-0.1], "stop", 1)], {})
    out = _reward(detector, 0.0, 0.0)(inputs)
    assert out.components["detector/named"][0] == len(set(sample.ref_names))
    np.testing.assert_allclose(out.components["detector/recall"], [1.0])
