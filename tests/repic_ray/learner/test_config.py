"""LearnerConfig: documented fields, strict loading, impossible values rejected."""

from __future__ import annotations

import dataclasses

import pytest

from repic_ray.config import ConfigError, field_docs, from_dict
from repic_ray.learner import CriticConfig, LearnerConfig, LoraConfig, LossConfig
from repic_ray.learner.engine import _LinearWarmup


@pytest.mark.parametrize("cls", [LearnerConfig, LoraConfig, LossConfig, CriticConfig])
def test_every_field_has_a_docstring(cls):
    assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_defaults_follow_repic():
    cfg = LearnerConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 128.0, 0.05)
    assert (cfg.loss.kl_beta, cfg.loss.kl_estimator, cfg.loss.loss_agg) == (
        0.04,
        "k3",
        "seq_mean_token_mean",
    )
    assert cfg.freeze_vision and cfg.zero_stage == 2
    assert "language_model" in cfg.lora.target_modules


def test_loads_nested_from_dict():
    cfg = from_dict(LearnerConfig, {"zero_stage": 3, "lora": {"r": 8}, "loss": {"clip_high": 0.28}})
    assert cfg.zero_stage == 3 and cfg.lora.r == 8 and cfg.loss.clip_high == 0.28


@pytest.mark.parametrize(
    "data, match",
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"dtype": "fp16"}, "dtype"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"betas": [0.9]}, "betas"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"loss": {"kl_estimator": "k4"}}, "loss.kl_estimator"),
        ({"loss": {"loss_agg": "seq-mean"}}, "loss.loss_agg"),
        ({"loss": {"loss_agg": "seq_mean_token_sum_norm"}}, "loss.max_len"),
        ({"loss": {"dual_clip": 1.0}}, "loss.dual_clip"),
        ({"critic": {"value_clip": 0.0}}, "critic.value_clip"),
        ({"lora_rank": 8}, "unknown key"),
    ],
)
def test_impossible_values_fail_naming_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(LearnerConfig, data)


def test_linear_warmup_factor():
    # warmup 4: optimizer steps 0..3 use 1/4, 2/4, 3/4, 4/4 of the peak lr, then stay.
    w = _LinearWarmup(4)
    assert [w(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _LinearWarmup(0)(0) == 1.0
