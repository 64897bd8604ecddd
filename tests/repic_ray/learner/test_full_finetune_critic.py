"""Full fine-tuning (frozen vision tower, frozen reference copy) with a PPO value head."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repic_ray.learner import CriticConfig, LearnerEngine, LoraConfig
from repic_ray.models.loading import load_policy
from repic_ray.ports import free_port

from .helpers import hf_logprobs, tiny_config, train_batch, write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("fft_images"))


@pytest.fixture(scope="module")
def learner():
    cfg = tiny_config(
        lora=LoraConfig(enabled=False),
        lr=1e-4,
        critic=CriticConfig(enabled=True, lr=1e-2, value_clip=0.2),
    )
    engine = LearnerEngine(cfg, master_port=free_port())
    yield engine
    engine.close()


def _ppo_batch(learner, images):
    """Advantages 0 (no policy gradient beyond the KL), returns 1 on every token,
    old values = the current value predictions."""
    batch = train_batch(learner.processor, images, [0.0] * 4)
    batch.old_logprobs_BT = learner.compute_logprobs(batch)
    mask_BT = batch.mask_BT
    return dataclasses.replace(
        batch, returns_BT=mask_BT.clone(), values_BT=learner.compute_values(batch)
    )


def test_critic_step_needs_returns(learner, images):
    batch = train_batch(learner.processor, images, [0.0] * 4)
    with pytest.raises(ValueError, match="returns_BT"):
        learner.train_step(batch)


def test_reference_is_the_frozen_initial_model(learner, images):
    hf = load_policy("tiny:qwen2.5-vl")
    batch = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5])
    ref0 = learner.compute_ref_logprobs(batch)
    want = hf_logprobs(
        hf, learner.processor, batch.prompt_texts[0], batch.image_paths[0], batch.completion_ids[0]
    )
    torch.testing.assert_close(ref0[0, : len(want)], want)
    batch.old_logprobs_BT = learner.compute_logprobs(batch)
    batch = dataclasses.replace(
        batch, returns_BT=batch.mask_BT, values_BT=learner.compute_values(batch)
    )
    learner.train_step(batch)
    torch.testing.assert_close(learner.compute_ref_logprobs(batch), ref0)
    assert (learner.compute_logprobs(batch) - ref0).abs().max() > 1e-4


def test_full_finetune_trains_language_model_and_value_head_not_vision(learner, images):
    before = {n: p.detach().clone() for n, p in learner.module.named_parameters()}
    learner.train_step(_ppo_batch(learner, images))
    after = dict(learner.module.named_parameters())
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if ".visual." in name:
            assert not changed and not after[name].requires_grad, name
    lm = [n for n in before if ".language_model.layers." in n]
    assert lm and all(
        not torch.equal(before[n], after[n].detach()) for n in lm if n.endswith("proj.weight")
    )
    assert not torch.equal(before["value_head.weight"], after["value_head.weight"].detach())


def test_value_head_moves_toward_returns(learner, images):
    # PPO value clipping lets each update move a value at most 0.2 from the old value
    # the batch carries, so refresh the old values every iteration as PPO does.
    def value_error() -> float:
        batch = _ppo_batch(learner, images)
        mask_BT = batch.mask_BT
        return float((((batch.values_BT - batch.returns_BT) * mask_BT) ** 2).sum() / mask_BT.sum())

    start = value_error()
    for _ in range(4):
        stats = learner.train_step(_ppo_batch(learner, images))
        assert stats.value_loss > 0
    assert value_error() < 0.8 * start


def test_values_are_zero_on_padding(learner, images):
    batch = _ppo_batch(learner, images)
    mask_BT = batch.mask_BT
    assert torch.all(batch.values_BT[mask_BT == 0] == 0)
    assert batch.values_BT.shape == mask_BT.shape


def test_export_full_is_the_plain_state_dict(learner):
    merged = learner.export_full()
    plain = load_policy("tiny:qwen2.5-vl").state_dict()
    assert list(merged) == list(plain)
    own = learner.hf_model.state_dict()
    for key in plain:
        assert torch.equal(merged[key], own[key]), key
    assert not torch.equal(
        merged["model.language_model.layers.0.mlp.up_proj.weight"],
        plain["model.language_model.layers.0.mlp.up_proj.weight"],
    )
