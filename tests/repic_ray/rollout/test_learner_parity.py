"""Learner log-probs equal vLLM's sampled-token log-probs on the same weights (fp32).

Before any update, after a LoRA update exported by the learner, and after a full-weight
update (the learner's merged export) — the three states a rollout worker serves in
training. The shared engine reports raw (temperature-1, unbiased) log-probs, so the
learner here adds no vision-token bias (`loss.block_vision_tokens: false`).
"""

from __future__ import annotations

import socket

import pytest
import torch

from repic_ray.learner.config import LearnerConfig, LoraConfig, LossConfig
from repic_ray.pipeline.experience import rollout_batch
from repic_ray.prompts import build_messages, render
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import RolloutRequest

TOL = 1e-3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tiny_qwen_dir, vllm_tiny_engine, image_paths):
    from repic_ray.learner.engine import LearnerEngine
    from repic_ray.models.loading import load_processor
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    cfg = LearnerConfig(
        model=str(tiny_qwen_dir), zero_stage=0, lr=0.05, micro_batch_size=8,
        lora=LoraConfig(r=8, alpha=16.0, dropout=0.0),
        loss=LossConfig(kl_beta=0.0, block_vision_tokens=False),
    )
    learner = LearnerEngine(cfg, master_port=_port())
    rollout = VLLMRolloutEngine(
        RolloutConfig(model=str(tiny_qwen_dir), dtype="float32", logprobs_mode="raw_logprobs",
                      limit_images_per_prompt=6, max_lora_rank=64, max_model_len=2048,
                      max_num_batched_tokens=8192),
        llm=vllm_tiny_engine,
    )
    proc = load_processor(str(tiny_qwen_dir))
    requests = [
        RolloutRequest(f"p{i}", render(build_messages(imgs, names, "Give a personalized caption."), proc), imgs)
        for i, (imgs, names) in enumerate([
            (image_paths[:3], ["Bo", "Mia"]),
            ([image_paths[3], image_paths[4]], ["Rex"]),
        ])
    ]
    return learner, rollout, requests


def rollout_and_compare(learner, rollout, requests, seed: int) -> torch.Tensor:
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=seed)
    results = rollout.generate(requests, sampling)
    batch = rollout_batch([(r, c) for r, res in zip(requests, results) for c in res.completions])
    batch.advantages_BT = batch.advantages_BT + torch.tensor([1.0, -1.0, 0.5] * len(requests))[:, None] * batch.mask_BT
    learner_BT = learner.compute_logprobs(batch)
    diff = ((learner_BT - batch.old_logprobs_BT).abs() * batch.mask_BT).max().item()
    assert diff < TOL, f"learner vs vLLM max |dlogp| = {diff:.2e}"
    return batch


def test_parity_before_and_after_lora_and_full_updates(setup, tiny_qwen_dir):
    from repic_ray.models.loading import load_policy

    learner, rollout, requests = setup
    batch = rollout_and_compare(learner, rollout, requests, seed=1)
    base_BT = batch.old_logprobs_BT.clone()

    # a real GRPO step moves the LoRA weights; the rollout loads the learner's export
    for _ in range(2):
        learner.train_step(batch)
    tensors, peft_config = learner.export_lora()
    rollout.update_lora(tensors, peft_config, version=1)
    assert rollout.policy_version == 1
    after_lora = rollout_and_compare(learner, rollout, requests, seed=1)
    # same seed and prompts: had the adapter not taken effect the log-probs would be base's
    assert not torch.allclose(after_lora.old_logprobs_BT[:, :1], base_BT[:, :1], atol=1e-3)

    # full weights: the learner's merged export replaces the base weights, adapter dropped
    rollout.update_full(learner.export_full(), version=2)
    rollout_and_compare(learner, rollout, requests, seed=2)

    # leave the shared engine as other tests expect it: base weights, no adapter
    rollout.update_full(load_policy(str(tiny_qwen_dir)).state_dict(), version=3)
