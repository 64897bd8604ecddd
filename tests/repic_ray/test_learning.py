"""Single-process learning on the synthetic world: vLLM rollouts + DeepSpeed learner, no Ray.

A short SFT warm start (full fine-tuning), then GRPO with RePIC's identity reward
(`yes_no_name_multi`: fraction of the image's names in a >=100-character caption).
The mean reward on held-out multi-concept prompts must rise by a clear margin; the
same loop with the advantage sign flipped must lower it. A few minutes on 2 cores.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from recipes.sft import make_sft_batch
from repic_ray.checkpoints import save_hf_checkpoint
from repic_ray.data.formats import load_samples
from repic_ray.data.synthetic import WorldConfig, generate_world
from repic_ray.learner.config import LearnerConfig, LoraConfig, LossConfig
from repic_ray.pipeline.episodes import make_request, reward_inputs
from repic_ray.pipeline.experience import compute_advantages, rollout_batch
from repic_ray.pipeline.sampler import PromptSampler
from repic_ray.ports import free_port
from repic_ray.rewards import RewardConfig, build_reward
from repic_ray.rollout.config import RolloutConfig, SamplingConfig

pytestmark = pytest.mark.slow

SFT_STEPS = 60
GRPO_STEPS = 6
MARGIN = 0.08


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = generate_world(root, config=WorldConfig(seed=5, num_concepts=4, num_train=96, num_sft=512,
                                                    num_eval_per_k=8))
    train = [s for s in load_samples(paths.train) if s.accu_reward_method == "yes_no_name_multi"]
    held_out = [s for k in (2, 3) for s in load_samples(paths.eval[k])]
    sft = [s for s in load_samples(paths.sft) if s.extra.get("task", "caption") == "caption"]
    return train, held_out, sft


@pytest.fixture(scope="module")
def sft_dir(world, tiny_qwen_dir, tmp_path_factory):
    from repic_ray.learner.engine import LearnerEngine
    from repic_ray.models.loading import load_processor

    torch.set_num_threads(1)
    _, _, sft = world
    cfg = LearnerConfig(model=str(tiny_qwen_dir), zero_stage=0, lr=2e-3, micro_batch_size=32,
                        lora=LoraConfig(enabled=False), loss=LossConfig(kl_beta=0.0))
    engine = LearnerEngine(cfg, master_port=free_port())
    proc = load_processor(str(tiny_qwen_dir))
    sampler, rng = PromptSampler(sft, seed=0), random.Random(0)
    for _ in range(SFT_STEPS):
        stats = engine.sft_step(make_sft_batch([s for _, s in sampler.next(32)], proc, rng, set()))
    assert stats.loss < 3.0  # the template is being learned
    return save_hf_checkpoint(engine.export_full(), str(tiny_qwen_dir), tmp_path_factory.mktemp("sft") / "ckpt")


def mean_reward(rollout, proc, reward, samples) -> float:
    pairs = [make_request(f"eval:{i}", s, proc, seed=0, n=4) for i, s in enumerate(samples)]
    results = rollout.generate([r for r, _ in pairs], SamplingConfig(n=4, temperature=1.0, max_tokens=64, seed=7))
    inputs = [x for s, res in zip(samples, results) for x in reward_inputs(s, res.completions, {})]
    return float(reward(inputs).rewards_B.mean())


def grpo(sign: float, sft_dir, world, vllm_tiny_engine, tiny_qwen_dir) -> tuple[float, float]:
    from repic_ray.learner.engine import LearnerEngine
    from repic_ray.models.loading import load_policy, load_processor
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    train, held_out, _ = world
    rollout = VLLMRolloutEngine(
        RolloutConfig(model=str(tiny_qwen_dir), dtype="float32", logprobs_mode="raw_logprobs",
                      limit_images_per_prompt=6, max_lora_rank=64, max_model_len=2048, max_num_batched_tokens=8192),
        llm=vllm_tiny_engine,
    )
    rollout.update_full(load_policy(str(sft_dir)).state_dict(), version=100)
    proc = load_processor(str(sft_dir))
    reward = build_reward(RewardConfig(verifiable_weight=1.0))
    learner = LearnerEngine(
        LearnerConfig(model=str(sft_dir), zero_stage=0, lr=5e-3, micro_batch_size=32,
                      lora=LoraConfig(r=16, alpha=32.0, dropout=0.0),
                      loss=LossConfig(kl_beta=0.0, block_vision_tokens=False)),
        master_port=free_port(),
    )
    held = held_out[:12]
    before = mean_reward(rollout, proc, reward, held)
    sampler = PromptSampler(train, seed=1)
    for step in range(GRPO_STEPS):
        items = sampler.next(8)
        pairs = [make_request(uid, s, proc, seed=step, n=8) for uid, s in items]
        results = rollout.generate([r for r, _ in pairs], SamplingConfig(n=8, temperature=1.0, max_tokens=64,
                                                                           seed=100 + step))
        rows, inputs, index = [], [], []
        for p, ((uid, s), (req, _), res) in enumerate(zip(items, pairs, results)):
            inputs += reward_inputs(s, res.completions, {})
            rows += [(req, c) for c in res.completions]
            index += [p] * len(res.completions)
        rewards_B = torch.as_tensor(reward(inputs).rewards_B, dtype=torch.float32)
        batch = rollout_batch(rows)
        batch.old_logprobs_BT = learner.compute_logprobs(batch)
        adv_BT, _ = compute_advantages("grpo", rewards_B, torch.as_tensor(index), batch.mask_BT)
        batch.advantages_BT = sign * adv_BT
        learner.train_step(batch)
        tensors, peft_cfg = learner.export_lora()
        rollout.update_lora(tensors, peft_cfg, version=101 + step)
    after = mean_reward(rollout, proc, reward, held)
    rollout.update_full(load_policy(str(tiny_qwen_dir)).state_dict(), version=200)  # leave the shared engine clean
    return before, after


def test_grpo_raises_identity_reward_and_flipped_sign_lowers_it(sft_dir, world, vllm_tiny_engine, tiny_qwen_dir):
    up_before, up_after = grpo(+1.0, sft_dir, world, vllm_tiny_engine, tiny_qwen_dir)
    down_before, down_after = grpo(-1.0, sft_dir, world, vllm_tiny_engine, tiny_qwen_dir)
    assert np.isclose(up_before, down_before)  # same SFT model, same seeded evaluation
    assert up_after > up_before + MARGIN, (up_before, up_after)
    assert down_after < down_before - MARGIN, (down_before, down_after)
