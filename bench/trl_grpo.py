"""TRL's `GRPOTrainer` set up as RePIC's recipe, on the same model, data and reward as ours.

What a user would pick instead of this project for GRPO on a VLM: TRL (checked against
trl 1.16 with transformers 5.19). The settings mirror our experiment config:
- `num_generations` = our group size G (RePIC: 8); one generation batch of P x G
  completions per optimizer step (`generation_batch_size` = P x G, micro-batches of the
  learner's `micro_batch_size` accumulated into one step), `num_iterations=1`;
- `beta` = our `learner.loss.kl_beta` (RePIC: 0.04, k3 KL to the reference = adapter off),
  `epsilon` = our clip (0.2), `loss_type="grpo"`: token losses averaged per sequence,
  then over the batch (RePIC's aggregation; TRL's default "dapo" normalizes by all tokens),
  `scale_rewards="group"`: (r - group mean) / group std;
- the same LoRA (rank, alpha, dropout, the language-model-only target regex), learning
  rate, precision (fp32 on CPU), temperature, top_p and `max_completion_length`;
- the same multi-image prompts in the same order: the samples our `PromptSampler` draws
  for the same seed (references with their names, then the query), in TRL's
  conversational format with an `images` column, TRL's own shuffling off, and the same
  name reward (`repic_ray.rewards.build_reward` with our reward config);
- gradient checkpointing as our learner has it (`learner.gradient_checkpointing`; TRL's
  `GRPOConfig` turns it on by default, which costs a second forward per step);
- torch threads: all cores of the machine unless `threads` says otherwise (a TRL user runs
  one process; it is recorded in the result), with generation and loss timed separately.
TRL generates with transformers `generate` here (its vLLM modes need a GPU server or a
colocated CUDA engine); that is what a TRL user on this machine gets.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from typing import Any

from repic_ray.rollout.types import Completion


def trl_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our prompt messages with image parts turned into TRL placeholders (filled from `images`)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if part.get("type") == "image" else dict(part) for part in content]
        out.append({"role": m["role"], "content": content})
    return out


def build_dataset(samples: list, processor: Any, seed: int):
    """A `datasets.Dataset` of conversational prompts, their images and the sample index."""
    import random

    from datasets import Dataset

    from repic_ray.prompts import build_prompt

    rows = []
    for i, s in enumerate(samples):
        # Same prompt (suffix seeded by the uid) as `make_request(f"trl:{i}", ...)` gives ours.
        prompt = build_prompt(s, processor, rng=random.Random(f"{seed}:trl:{i}"))
        rows.append({"prompt": trl_messages(prompt.messages), "images": prompt.load_images(), "sample_index": i})
    return Dataset.from_list(rows)


def name_reward_func(samples: list, reward_cfg: Any, categories: dict[str, str]):
    """A TRL reward function computing our reward for each completion."""
    from repic_ray.pipeline.episodes import reward_inputs, sample_references
    from repic_ray.rewards import build_reward

    corpus = [refs for refs in map(sample_references, samples) if refs]  # CIDEr-D's document frequencies
    reward = build_reward(reward_cfg, reference_corpus=corpus or None)

    def repic_reward(prompts, completions, sample_index, **_: Any) -> list[float]:
        inputs = []
        for i, comp in zip(sample_index, completions):
            text = comp if isinstance(comp, str) else comp[-1]["content"]
            if isinstance(text, list):  # structured content blocks
                text = "".join(part.get("text") or "" for part in text)
            done = Completion(text=text, token_ids=[], logprobs=[], finish_reason="stop", policy_version=0)
            inputs += reward_inputs(samples[int(i)], [done], categories)
        return [float(r) for r in reward(inputs).rewards_B]

    return repic_reward


def sampler_order(train: list, seed: int, prompts_per_step: int, steps: int) -> list:
    """The training samples our driver's `PromptSampler` draws in its first `steps` steps."""
    from repic_ray.pipeline.sampler import PromptSampler

    sampler = PromptSampler(train, seed=seed)
    return [item for _ in range(steps) for _, item in sampler.next(prompts_per_step)]


def run_trl(cfg: Any, samples: list, categories: dict[str, str], steps: int, warmup: int,
            threads: int | None = None) -> dict[str, Any]:
    """Train `warmup + steps` GRPO steps with TRL on `samples` in order (P per step); time the
    last `steps` (step ends, wall clock) and, within them, generation + scoring and the loss."""
    import os

    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit("TRL is a benchmark-only dependency: pip install -e '.[bench]' "
                         "(`make install` includes it), or pass --systems ours") from e

    from repic_ray.models.loading import load_processor
    from repic_ray.rollout.common import vision_token_ids

    P, G = cfg.algo.prompts_per_step, cfg.algo.group_size
    micro = min(cfg.learner.micro_batch_size, P * G)
    if (P * G) % micro:
        raise ValueError(f"P x G = {P * G} must be a multiple of learner.micro_batch_size={micro}")
    processor = load_processor(cfg.rollout.tokenizer or cfg.rollout.model)
    dataset = build_dataset(samples, processor, cfg.trainer.seed)
    # As TRL loads a processor itself: prompts are left-padded for generation (right padding
    # misaligns the processor's mm_token_type_ids with TRL's left-padded prompt ids).
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.truncation_side = "left"

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    phase_seconds: dict[str, list[float]] = {"generate_and_score": [], "loss_forward": []}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its two phases timed: generation + scoring (which includes the
        old/reference log-prob forwards) and the loss (policy forward; backward is timed
        by the step clock minus these)."""

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            phase_seconds["generate_and_score"].append(time.perf_counter() - t)
            return out

        def compute_loss(self, *a, **kw):
            t = time.perf_counter()
            out = super().compute_loss(*a, **kw)
            phase_seconds["loss_forward"].append(time.perf_counter() - t)
            return out

    torch.set_num_threads(threads or os.cpu_count() or 1)
    clock = StepClock()
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    args = GRPOConfig(
        output_dir=out_dir,
        max_steps=warmup + steps,
        per_device_train_batch_size=micro,
        shuffle_dataset=False,  # `samples` already come in our sampler's order
        gradient_checkpointing=cfg.learner.gradient_checkpointing,
        gradient_accumulation_steps=(P * G) // micro,
        generation_batch_size=P * G,
        num_generations=G,
        num_iterations=1,
        max_completion_length=cfg.sampling.max_tokens,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        beta=cfg.learner.loss.kl_beta,
        epsilon=cfg.learner.loss.clip_low,
        epsilon_high=cfg.learner.loss.clip_high,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=cfg.learner.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=cfg.learner.grad_clip,
        weight_decay=cfg.learner.weight_decay,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=cfg.trainer.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # TRL suppresses only `<|image_pad|>`; a sampled `<|vision_start|>` (a random or weak
        # policy does sample it) breaks Qwen2.5-VL's M-RoPE index in the log-prob forward.
        # Block every vision special token, as our engines do.
        generation_kwargs={"suppress_tokens": vision_token_ids(processor.tokenizer)},
    )
    lora = cfg.learner.lora
    trainer = TimedGRPOTrainer(
        model=cfg.rollout.model,
        reward_funcs=name_reward_func(samples, cfg.reward, categories),
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[clock],
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, task_type="CAUSAL_LM"),
    )
    trainer.train()
    if len(clock.ends) != warmup + steps:
        raise RuntimeError(f"TRL ran {len(clock.ends)} steps, expected {warmup + steps}")
    start = clock.ends[warmup - 1] if warmup else clock.begin
    seconds = clock.ends[-1] - start
    marks = [clock.begin, *clock.ends]
    step_seconds = [b - a for a, b in itertools.pairwise(marks)][warmup:]
    accum = args.gradient_accumulation_steps
    gen = phase_seconds["generate_and_score"]
    loss = phase_seconds["loss_forward"]
    # One generation per optimizer step (generation_batch_size = P x G); `accum` loss calls.
    phases = {"generate_and_score": sum(gen[warmup:]) / steps,
              "loss_forward": sum(loss[warmup * accum:]) / steps}
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    return {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "step_seconds": step_seconds,
        "samples_per_s": steps * P * G / seconds,
        "phase_seconds_per_step": phases,
        "torch_threads": torch.get_num_threads(),
        "reward_mean": float(sum(h.get("reward", 0.0) for h in logs[warmup:]) / max(len(logs[warmup:]), 1)),
        "completion_tokens_mean": float(
            sum(h.get("completions/mean_length", 0.0) for h in logs[warmup:]) / max(len(logs[warmup:]), 1)
        ),
        "settings": {"loss_type": "grpo", "beta": args.beta, "num_generations": G, "epsilon": args.epsilon,
                     "generation_batch_size": P * G, "per_device_train_batch_size": micro,
                     "gradient_checkpointing": args.gradient_checkpointing, "shuffle_dataset": False,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps, "generation": "transformers"},
    }
