"""The tiny Qwen2.5-VL gives the same tokens and log-probs in HF transformers and vLLM.

This is what lets the rollout (vLLM) and the learner (HF) share one policy: a prompt with
two reference images and a query image, rendered by the real chat template, decoded
greedily in fp32 by both, with the vision special tokens blocked in both.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from repic_ray.models.loading import (
    load_policy,
    load_processor,
    qwen_mm_inputs,
    vision_special_token_ids,
)

MAX_TOKENS = 16


def _reference(colour) -> Image.Image:
    image = Image.new("RGB", (28, 28), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([3, 3, 24, 24], fill=colour)
    return image


def _query() -> Image.Image:
    image = Image.new("RGB", (84, 84), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse([3, 3, 24, 24], fill=(220, 40, 40))
    draw.rectangle([59, 59, 80, 80], fill=(40, 80, 220))
    return image


def _messages(question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "This is <Bo>.\n"},
                {"type": "image"},
                {"type": "text", "text": "This is <Mia>.\n"},
                {"type": "image"},
                {"type": "text", "text": question},
            ],
        }
    ]


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir):
    return load_processor(str(tiny_qwen_dir)), load_policy(str(tiny_qwen_dir))


@pytest.mark.parametrize(
    "question",
    [
        "Give a personalized caption of this image.",
        "Is <Bo> in this image? The final answer must be either 'yes' or 'no'.",
    ],
)
def test_hf_and_vllm_greedy_tokens_and_logprobs_agree(vllm_tiny_engine, hf, question):
    from vllm import SamplingParams

    processor, model = hf
    images = [_reference((220, 40, 40)), _reference((40, 80, 220)), _query()]
    text = processor.apply_chat_template(
        _messages(question), add_generation_prompt=True, tokenize=False
    )
    blocked = vision_special_token_ids(processor)

    enc = qwen_mm_inputs(processor, text, images)
    assert enc["mm_token_type_ids"].sum().item() == 1 + 1 + 9
    n_prompt = enc["input_ids"].shape[1]
    with torch.no_grad():
        hf_ids = model.generate(
            **enc, do_sample=False, max_new_tokens=MAX_TOKENS, suppress_tokens=blocked
        )[0, n_prompt:].tolist()

    params = SamplingParams(
        temperature=0,
        max_tokens=MAX_TOKENS,
        logit_bias={i: -100.0 for i in blocked},
        logprobs=0,
    )
    (out,) = vllm_tiny_engine.generate(
        {"prompt": text, "multi_modal_data": {"image": images}}, params, use_tqdm=False
    )
    completion = out.outputs[0]
    assert out.prompt_token_ids == enc["input_ids"][0].tolist()
    assert list(completion.token_ids) == hf_ids
    assert len(hf_ids) >= 2 and not set(hf_ids) & set(blocked)

    # vLLM's sampled-token log-probs (raw, temperature 1) against the learner's path:
    # one HF forward over prompt + completion, with `mm_token_type_ids` extended by text.
    ids = torch.tensor([out.prompt_token_ids + hf_ids])
    extra = torch.zeros(1, len(hf_ids), dtype=enc["mm_token_type_ids"].dtype)
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], extra], dim=1),
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
        ).logits
    hf_logprobs = logits[0, n_prompt - 1 : -1].log_softmax(-1)
    hf_logprobs = hf_logprobs.gather(-1, torch.tensor(hf_ids)[:, None])[:, 0]
    vllm_logprobs = torch.tensor(
        [step[t].logprob for step, t in zip(completion.logprobs, hf_ids, strict=True)]
    )
    torch.testing.assert_close(vllm_logprobs, hf_logprobs, atol=1e-4, rtol=0)
