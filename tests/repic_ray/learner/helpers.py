"""Shared builders for the learner tests: images, rendered prompts, batches, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repic_ray.learner import LearnerConfig, LoraConfig, LossConfig, SFTBatch, TrainBatch

CAPTIONS = [
    " Bo the dog sits at the top left next to a red circle.",
    " Mia",
    " yes",
    " here you can see Rex the cat in the center of the picture",
]


def write_images(root: Path) -> dict[str, str]:
    """Two 28x28 references (1 vision token each) and two 84x84 queries (3x3 tokens)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, size in [("ref0", 28), ("ref1", 28), ("query0", 84), ("query1", 84)]:
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        out[name] = str(path)
    return out


def render_prompt(
    processor, n_images: int, text: str = "Give a personalized caption of this image."
) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def rl_rows(processor, images: dict[str, str]):
    """Four (prompt, images, completion) rows: multi-image, single-image, text-only,
    and a second multi-image prompt, with completions of different lengths."""
    tok = processor.tokenizer
    image_lists = [
        [images["ref0"], images["ref1"], images["query0"]],
        [images["query1"]],
        [],
        [images["ref1"], images["query1"]],
    ]
    prompts = [render_prompt(processor, len(p)) for p in image_lists]
    completions = [tok.encode(c) for c in CAPTIONS]
    return prompts, image_lists, completions


def train_batch(processor, images, advantages_B, old_logprobs_BT=None) -> TrainBatch:
    prompts, image_lists, completions = rl_rows(processor, images)
    T = max(len(c) for c in completions)
    old = torch.zeros(len(prompts), T) if old_logprobs_BT is None else old_logprobs_BT
    return TrainBatch(
        prompts, image_lists, completions, old, torch.as_tensor(advantages_B, dtype=torch.float32)
    )


def sft_batch(processor, images, weight_names: bool = False) -> SFTBatch:
    prompts, image_lists, completions = rl_rows(processor, images)
    up = None
    if weight_names:
        names = {processor.tokenizer.encode(n)[0] for n in (" Bo", " Mia", " Rex")}
        up = [sorted(names & set(c)) for c in completions]
    return SFTBatch(prompts, image_lists, completions, up)


def tiny_config(**overrides) -> LearnerConfig:
    """LoRA r=8 without dropout (so every pass is deterministic), ZeRO-2, micro 2."""
    base = {
        "model": "tiny:qwen2.5-vl",
        "lora": LoraConfig(r=8, alpha=16.0, dropout=0.0),
        "zero_stage": 2,
        "lr": 1e-3,
        "micro_batch_size": 2,
        "loss": LossConfig(kl_beta=0.04),
    }
    base.update(overrides)
    return LearnerConfig(**base)


def rollout_logit_bias(processor, vocab_size: int) -> torch.Tensor:
    """bias_V of the rollout engines: -100 on the vision special tokens they never sample."""
    from repic_ray.models.loading import vision_special_token_ids

    bias_V = torch.zeros(vocab_size)
    bias_V[vision_special_token_ids(processor)] = -100.0
    return bias_V


def hf_logprobs(
    model, processor, prompt: str, image_paths: list[str], completion: list[int]
) -> torch.Tensor:
    """Log-probs of `completion` after `prompt` from one unpadded forward of a plain HF
    model over the whole sequence, plus the rollout's logit bias (the reference the
    learner must reproduce)."""
    from repic_ray.data.images import load_image
    from repic_ray.models.loading import qwen_mm_inputs

    enc = qwen_mm_inputs(processor, prompt, [load_image(p) for p in image_paths])
    n_p = enc["input_ids"].shape[1]
    comp = torch.tensor([completion])
    kwargs = {
        "input_ids": torch.cat([enc["input_ids"], comp], 1),
        "attention_mask": torch.ones(1, n_p + comp.shape[1], dtype=torch.long),
        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1),
    }
    if image_paths:
        kwargs["pixel_values"] = enc["pixel_values"]
        kwargs["image_grid_thw"] = enc["image_grid_thw"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.rope_deltas = None
    with torch.no_grad():
        logits = model(**kwargs).logits[0, n_p - 1 : -1].float()
    logits = logits + rollout_logit_bias(processor, logits.shape[-1])
    return torch.log_softmax(logits, -1).gather(-1, comp[0][:, None])[:, 0]
