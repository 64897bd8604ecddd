"""Shared pieces of the rollout tests: configs, prompts, an HF log-prob reference."""

from __future__ import annotations

import copy

import torch

from repic_ray.rollout.common import load_images
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import RolloutRequest

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def tiny_rollout_config(model: str, logprobs_mode: str = "processed_logprobs") -> RolloutConfig:
    return RolloutConfig(
        model=model,
        dtype="float32",
        max_lora_rank=16,
        max_model_len=1024,
        max_num_batched_tokens=8192,
        max_num_seqs=64,
        kv_cache_gib=1,
        logprobs_mode=logprobs_mode,
        sampling=SamplingConfig(n=2, max_tokens=8, seed=0),
    )


def chat_prompt(tokenizer, num_images: int, text: str = "Give a personalized caption of this image.") -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def hf_sampled_logprobs(
    model,
    processor,
    request: RolloutRequest,
    token_ids: list[int],
    temperature: float = 1.0,
    blocked: list[int] = (),
) -> torch.Tensor:
    """Log-probs of `token_ids` after the prompt, recomputed by a transformers forward pass
    (the distribution vLLM samples from in processed mode: blocked tokens removed, logits
    divided by the temperature; `blocked=()` and 1.0 give the raw log-probs)."""
    images = load_images(request)
    inputs = processor(text=[request.prompt_text], images=images or None, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    completion = torch.tensor([token_ids])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1
    )
    for module in model.modules():
        if hasattr(module, "rope_deltas"):
            module.rope_deltas = None
    logits_TV = model(**inputs).logits[0, prompt_len - 1 : -1].float()
    if len(blocked):
        logits_TV[:, list(blocked)] = float("-inf")
    logprobs_TV = torch.log_softmax(logits_TV / temperature, dim=-1)
    return logprobs_TV.gather(-1, completion[0][:, None])[:, 0]


def make_lora_update(model, seed: int):
    """Random non-zero LoRA weights (A and B) on the language model, built with peft."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tensors = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model.eval(), tensors, peft_model.peft_config["default"].to_dict()


def perturbed_state_dict(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every floating weight moved by 5% of its spread (at least 0.005)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * v.std().clamp(min=0.1) * torch.randn(v.shape, generator=gen)
        if v.is_floating_point() and v.numel() > 1
        else v
        for k, v in state_dict.items()
    }
