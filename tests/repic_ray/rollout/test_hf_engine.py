"""HFRolloutEngine on the tiny random Qwen2.5-VL: samples, processed log-probs against a
plain forward pass, stop strings, seeds, weight updates, and greedy agreement with vLLM."""

from __future__ import annotations

import copy

import pytest
import torch

from repic_ray.models.loading import VISION_SPECIAL_TOKENS
from repic_ray.rollout.config import SamplingConfig
from repic_ray.rollout.hf_engine import HFRolloutEngine
from repic_ray.rollout.types import RolloutRequest
from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

from .helpers import (
    chat_prompt,
    hf_sampled_logprobs,
    make_lora_update,
    perturbed_state_dict,
    tiny_rollout_config,
)

SAMPLING = SamplingConfig(n=2, max_tokens=8, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir):
    return HFRolloutEngine(tiny_rollout_config(str(tiny_qwen_dir), "processed_logprobs"))


@pytest.fixture(scope="module")
def requests(engine, image_paths):
    return [
        RolloutRequest(f"k{k}", chat_prompt(engine.tokenizer, k), image_paths[:k], n=3 if k == 1 else None)
        for k in (1, 2, 4)
    ]


def assert_processed_logprobs_match(model, engine, requests, results, temperature=1.0):
    for req, res in zip(requests, results):
        for c in res.completions:
            ref_T = hf_sampled_logprobs(
                model, engine.processor, req, c.token_ids, temperature, engine._blocked
            )
            torch.testing.assert_close(torch.tensor(c.logprobs), ref_T, atol=1e-4, rtol=0)


def test_samples_and_processed_logprobs(engine, requests):
    # Temperature 0.7: processed log-probs are those of logits / 0.7 with vision tokens removed.
    sampling = SamplingConfig(n=2, max_tokens=8, seed=0, temperature=0.7)
    results = engine.generate(requests, sampling)
    assert [r.uid for r in results] == ["k1", "k2", "k4"]
    assert [len(r.completions) for r in results] == [3, 2, 2]
    vision_ids = {engine.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    for res in results:
        for c in res.completions:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert (c.finish_reason == "length") == (len(c.token_ids) == sampling.max_tokens)
            assert not set(c.token_ids) & vision_ids
            assert c.policy_version == 0
    assert_processed_logprobs_match(engine.base_model, engine, requests, results, temperature=0.7)


def test_seed_reproduces_and_stop_string_cuts(engine, requests):
    first = engine.generate(requests, SAMPLING)
    again = engine.generate(requests, SAMPLING)
    assert [c.token_ids for r in first for c in r.completions] == [
        c.token_ids for r in again for c in r.completions
    ]
    full = next(c for r in first for c in r.completions if len(c.text.strip()) >= 6)
    stop = full.text[len(full.text) // 2 :][:3]
    cut_results = engine.generate(requests, SamplingConfig(n=2, max_tokens=8, seed=0, stop=[stop]))
    i, j = next(
        (i, j) for i, r in enumerate(first) for j, c in enumerate(r.completions) if c is full
    )
    cut = cut_results[i].completions[j]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_updates_take_effect(tiny_qwen_dir, requests):
    engine = HFRolloutEngine(tiny_rollout_config(str(tiny_qwen_dir), "processed_logprobs"))
    base = copy.deepcopy(engine.base_model)
    peft_model, tensors, peft_config = make_lora_update(base, seed=21)
    engine.update_lora(tensors, peft_config, version=3)
    results = engine.generate(requests, SAMPLING)
    assert {c.policy_version for r in results for c in r.completions} == {3}
    assert_processed_logprobs_match(peft_model, engine, requests, results)

    perturbed = perturbed_state_dict(base.state_dict(), seed=4)
    new_model = copy.deepcopy(base)
    new_model.load_state_dict(perturbed)
    engine.update_full(perturbed, version=4)  # drops the adapter
    results = engine.generate(requests, SAMPLING)
    assert engine.model is engine.base_model
    assert {c.policy_version for r in results for c in r.completions} == {4}
    assert_processed_logprobs_match(new_model, engine, requests, results)
    with pytest.raises(ValueError, match="not in the checkpoint.*lm_head.nope"):
        engine.update_full({"lm_head.nope": torch.zeros(1)}, version=5)


def test_greedy_tokens_agree_with_vllm(engine, requests, vllm_tiny_engine, tiny_qwen_dir):
    mode = vllm_tiny_engine.llm_engine.model_config.logprobs_mode
    vllm = VLLMRolloutEngine(tiny_rollout_config(str(tiny_qwen_dir), mode), llm=vllm_tiny_engine)
    greedy = SamplingConfig(n=1, max_tokens=12, temperature=0.0)
    single = [RolloutRequest(r.uid, r.prompt_text, r.image_paths, n=1) for r in requests]
    hf_tokens = [r.completions[0].token_ids for r in engine.generate(single, greedy)]
    vllm_tokens = [r.completions[0].token_ids for r in vllm.generate(single, greedy)]
    vllm.close()
    assert hf_tokens == vllm_tokens
