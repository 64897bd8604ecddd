"""RolloutConfig / SamplingConfig reject impossible values, naming the field."""

from __future__ import annotations

import pytest

from repic_ray.config import field_docs
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.vllm_engine import llm_kwargs


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "sampling.n"),
        ({"temperature": 2.5}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"stop": [""]}, "sampling.stop"),
    ],
)
def test_sampling_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "fp8"}, "rollout.dtype"),
        ({"max_model_len": 4096, "max_num_batched_tokens": 2048}, "rollout.max_num_batched_tokens"),
        ({"kv_cache_gib": 0.0}, "rollout.kv_cache_gib"),
        ({"logprobs_mode": "raw_logits"}, "rollout.logprobs_mode"),
        ({"tensor_parallel_size": 0}, "rollout.tensor_parallel_size"),
    ],
)
def test_rollout_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RolloutConfig(**kwargs)


def test_every_field_is_documented():
    for cls in (RolloutConfig, SamplingConfig):
        assert set(field_docs(cls)) == set(cls.__dataclass_fields__), cls.__name__


def test_llm_kwargs_carry_memory_and_lora_limits():
    kwargs = llm_kwargs(RolloutConfig(model="m", kv_cache_gib=1.5, max_lora_rank=32))
    assert kwargs["kv_cache_memory_bytes"] == 1.5 * 2**30
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"]) == (True, 32)
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    assert "enable_lora" not in llm_kwargs(RolloutConfig(model="m", enable_lora=False))
