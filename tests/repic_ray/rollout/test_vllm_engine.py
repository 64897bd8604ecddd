"""VLLMRolloutEngine on the tiny random Qwen2.5-VL: sampling, log-probs against a
transformers recomputation, and live LoRA / full-weight updates.

The vLLM engine is the session-wide `vllm_tiny_engine`; tests that change its weights put
the original weights back before they return.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from repic_ray.models.loading import VISION_SPECIAL_TOKENS
from repic_ray.rollout.config import SamplingConfig
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
def engine(vllm_tiny_engine, tiny_qwen_dir):
    mode = vllm_tiny_engine.llm_engine.model_config.logprobs_mode
    eng = VLLMRolloutEngine(tiny_rollout_config(str(tiny_qwen_dir), mode), llm=vllm_tiny_engine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen_dir)


@pytest.fixture(scope="module")
def requests(engine, image_paths):
    """Prompts with 1 to 5 reference/query images; the first asks for 3 samples."""
    return [
        RolloutRequest(f"k{k}", chat_prompt(engine.tokenizer, k), image_paths[:k], n=3 if k == 1 else None)
        for k in range(1, 6)
    ]


@pytest.fixture(scope="module")
def sampled(engine, requests):
    return engine.generate(requests, SAMPLING)


def reference_blocked(engine) -> list[int]:
    """What processed log-probs exclude (nothing in raw mode)."""
    return engine._blocked if engine.cfg.logprobs_mode == "processed_logprobs" else []


def assert_logprobs_match(engine, model, processor, requests, results, tol=1e-3):
    for req, res in zip(requests, results):
        for c in res.completions:
            ref_T = hf_sampled_logprobs(model, processor, req, c.token_ids, 1.0, reference_blocked(engine))
            diff = (torch.tensor(c.logprobs) - ref_T).abs().max().item()
            assert diff < tol, f"{req.uid}: vLLM vs HF log-prob difference {diff}"


def max_logprob_gap(model, processor, engine, requests, results) -> float:
    gaps = []
    for req, res in zip(requests, results):
        for c in res.completions:
            ref_T = hf_sampled_logprobs(model, processor, req, c.token_ids, 1.0, reference_blocked(engine))
            gaps.append((torch.tensor(c.logprobs) - ref_T).abs().max().item())
    return max(gaps)


def test_n_samples_with_one_logprob_per_token(sampled, requests):
    assert [r.uid for r in sampled] == [r.uid for r in requests]
    assert [len(r.completions) for r in sampled] == [3, 2, 2, 2, 2]
    for res in sampled:
        for c in res.completions:
            assert 1 <= len(c.token_ids) <= SAMPLING.max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 and lp > float("-inf") for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == SAMPLING.max_tokens)
            assert c.policy_version == 0


def test_logprobs_match_transformers_recomputation(engine, hf, requests, sampled):
    # Multi-image prompts (1-5 images) exercise the 3D M-RoPE positions on both sides.
    assert_logprobs_match(engine, *hf, requests, sampled)


def test_seeded_sampling_is_reproducible_and_independent_of_batch_order(engine, requests, sampled):
    again = {r.uid: r for r in engine.generate(requests[::-1], SAMPLING)}
    for res in sampled:
        assert [c.token_ids for c in again[res.uid].completions] == [c.token_ids for c in res.completions]
    other = engine.generate(requests, SamplingConfig(n=2, max_tokens=8, seed=1))
    assert [c.token_ids for r in other for c in r.completions] != [
        c.token_ids for r in sampled for c in r.completions
    ]


def test_seeded_batch_larger_than_one_engine_step(engine, requests, sampled):
    """A seeded batch whose prompts exceed `max_num_batched_tokens` (8192) in total runs
    and samples what the small batch did: prompts are never split across steps (split, a
    seeded prompt failed with "CPU Generator does not use offset")."""
    big = [RolloutRequest(f"{r.uid}-copy{i}", r.prompt_text, r.image_paths, n=8)
           for i in range(8) for r in requests]
    prompt_tokens = sum(8 * len(engine.tokenizer(r.prompt_text).input_ids) for r in big)
    assert prompt_tokens > engine.cfg.max_num_batched_tokens  # image tokens come on top
    out = engine.generate(big + requests, SAMPLING)
    again = {r.uid: r for r in out}
    for res in sampled:
        assert [c.token_ids for c in again[res.uid].completions] == [c.token_ids for c in res.completions]


def test_stop_string_cuts_text_and_sampling(engine, requests, sampled):
    # Stop on a piece of a completion seen above: with the same seed the engine samples the
    # same tokens until the piece appears, then stops and drops it from the text.
    full = next(c for r in sampled for c in r.completions if len(c.text.strip()) >= 6)
    req = next(r for r, res in zip(requests, sampled) if full in res.completions)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip()
    n = SAMPLING.n if req.n is None else req.n
    (res,) = engine.generate([req], SamplingConfig(n=n, max_tokens=8, seed=0, stop=[stop]))
    index = next(i for r in sampled if r.uid == req.uid for i, c in enumerate(r.completions) if c is full)
    cut = res.completions[index]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert len(cut.token_ids) < len(full.token_ids) or full.finish_reason == "stop"


def test_stop_string_at_the_start_leaves_an_empty_text(engine, requests, sampled):
    # A stop string that opens a completion cuts its text to "": the engine keeps vLLM's
    # empty text rather than decoding the tokens sampled up to the stop.
    full = next((c for r in sampled for c in r.completions if c.text[:3].strip() == c.text[:3]), None)
    if full is None:
        pytest.skip("no sampled completion opens with three visible characters")
    req = next(r for r, res in zip(requests, sampled) if full in res.completions)
    index = next(i for r in sampled if r.uid == req.uid for i, c in enumerate(r.completions) if c is full)
    n = SAMPLING.n if req.n is None else req.n
    (res,) = engine.generate([req], SamplingConfig(n=n, max_tokens=8, seed=0, stop=[full.text[:3]]))
    cut = res.completions[index]
    assert cut.finish_reason == "stop" and cut.token_ids
    assert cut.text == ""


def test_text_decoded_at_the_end_equals_vllms_incremental_detokenizer(engine, requests, sampled):
    # Without stop strings the engine skips vLLM's detokenizer and decodes each completion
    # once; a stop string that never occurs keeps vLLM detokenizing as it samples. Same
    # seed, same tokens: the texts must agree (the tiny random model writes any token).
    never = SamplingConfig(n=SAMPLING.n, max_tokens=SAMPLING.max_tokens, seed=0, stop=["\x00never\x00"])
    detokenized = engine.generate(requests, never)
    pairs = [(a, b) for r, d in zip(sampled, detokenized) for a, b in zip(r.completions, d.completions)]
    assert pairs and all(a.token_ids == b.token_ids for a, b in pairs)
    assert any(a.text.strip() for a, _ in pairs)
    assert [a.text for a, _ in pairs] == [b.text for _, b in pairs]


def test_vision_special_tokens_are_never_sampled(engine, requests):
    vision_ids = {engine.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    assert set(engine._blocked) == vision_ids
    # At temperature 2 the tiny model puts ~0.3% of its mass on vision tokens per position
    # (measured with transformers): ~12 expected in 4096 unblocked tokens, as the control
    # run shows, so none in as many blocked tokens is not luck.
    hot = SamplingConfig(n=64, max_tokens=32, seed=3, temperature=2.0)
    sampled = engine.generate(requests[:2], hot)
    tokens = {t for r in sampled for c in r.completions for t in c.token_ids}
    assert not tokens & vision_ids
    unblocked = engine.generate(requests[:2], SamplingConfig(**{**hot.__dict__, "block_vision_tokens": False}))
    assert {t for r in unblocked for c in r.completions for t in c.token_ids} & vision_ids


def test_update_lora_takes_effect_and_matches_peft(engine, hf, requests):
    model, processor = hf
    try:
        for version, seed in ((1, 11), (2, 12)):
            peft_model, tensors, peft_config = make_lora_update(model, seed)
            assert all(re.search(r"lora_[AB]\.weight$", k) for k in tensors)
            engine.update_lora(tensors, peft_config, version=version)
            results = engine.generate(requests, SAMPLING)
            assert {c.policy_version for r in results for c in r.completions} == {version}
            # The adapter of this version, not the base model nor the previous adapter.
            assert_logprobs_match(engine, peft_model, processor, requests, results)
            assert max_logprob_gap(model, processor, engine, requests, results) > 1e-2
    finally:
        engine.load_base()
    assert engine._lora_request is None and engine.policy_version == 0
    assert_logprobs_match(engine, model, processor, requests[:2], engine.generate(requests[:2], SAMPLING))


def test_update_full_takes_effect_and_matches_transformers(engine, hf, requests, sampled):
    model, processor = hf
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # Every weight moves, vision tower included: re-sent images must be re-encoded.
    perturbed = perturbed_state_dict(original, seed=5)
    new_model = copy.deepcopy(model)
    new_model.load_state_dict(perturbed)
    try:
        engine.update_full(perturbed, version=7)
        results = engine.generate(requests, SAMPLING)
        assert {c.policy_version for r in results for c in r.completions} == {7}
        assert_logprobs_match(engine, new_model, processor, requests, results)
        assert max_logprob_gap(model, processor, engine, requests, results) > 1e-2
    finally:
        engine.load_base()  # the checkpoint's weights, reloaded from disk
    assert engine._full_dir is None and engine.policy_version == 0
    again = engine.generate(requests, SAMPLING)
    assert [c.token_ids for r in again for c in r.completions] == [c.token_ids for r in sampled for c in r.completions]


def test_bad_requests_and_updates_are_rejected_by_name(engine, requests, image_paths):
    prompt = requests[1].prompt_text
    with pytest.raises(ValueError, match="request 'x'.*2 image placeholder.*1 image path"):
        engine.generate([RolloutRequest("x", prompt, image_paths[:1])])
    with pytest.raises(ValueError, match="request 'y'.*cannot read image '/no/such.png'"):
        engine.generate([RolloutRequest("y", prompt, [image_paths[0], "/no/such.png"])])
    with pytest.raises(ValueError, match="duplicate request uid 'k2'"):
        engine.generate([requests[1], requests[1]])
    with pytest.raises(ValueError, match="not in the checkpoint.*model.layers.0.nonexistent"):
        engine.update_full({"model.layers.0.nonexistent": torch.zeros(1)}, version=1)
    with pytest.raises(ValueError, match="peft adapter names"):
        engine.update_lora({"q_proj.weight": torch.zeros(1)},
                           {"r": 8, "lora_alpha": 16, "target_modules": "x"}, version=1)
    assert engine.policy_version == 0


def test_greedy_member_is_the_greedy_completion_beside_sampled_ones(engine, requests):
    # sampling.greedy_member: of n completions per prompt, n - 1 sampled and the last the
    # greedy decode (what evaluation and the service write), with temperature-1 log-probs.
    mixed = SamplingConfig(n=3, max_tokens=8, seed=0, greedy_member=True)
    picked = requests[1:4]  # n from the sampling config (the first request asks for its own n)
    got = engine.generate(picked, mixed)
    greedy = engine.generate(picked, SamplingConfig(n=1, max_tokens=8, temperature=0.0))
    plain = engine.generate(picked, SamplingConfig(n=2, max_tokens=8, seed=0))
    for res, g, p in zip(got, greedy, plain):
        assert len(res.completions) == 3
        assert res.completions[-1].token_ids == g.completions[0].token_ids
        assert res.completions[-1].logprobs == pytest.approx(g.completions[0].logprobs, abs=1e-5)
        # the sampled ones are the seeded samples a plain request of n - 1 draws
        assert [c.token_ids for c in res.completions[:2]] == [c.token_ids for c in p.completions[:2]]
    with pytest.raises(ValueError, match="greedy_member needs n >= 2"):
        engine.generate(picked[:1], SamplingConfig(n=1, max_tokens=8, greedy_member=True))
