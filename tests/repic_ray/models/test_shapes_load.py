"""The shape-faithful Qwen2.5-VL-7B builds offline and loads like the real checkpoint:
through `load_policy` / `load_processor` in HF transformers, and in vLLM, which agree on
the log-probs of the same tokens (bf16). Slow: ~3.3 GB of weights, a vLLM engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from repic_ray.models.loading import load_policy, load_processor, qwen_mm_inputs, resolve_checkpoint

pytestmark = pytest.mark.slow
SPEC = "tiny:qwen2.5-vl-7b-shapes"


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return Path(resolve_checkpoint(SPEC))


def _image(path: Path) -> Path:
    image = Image.new("RGB", (112, 112), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([10, 10, 80, 80], fill=(220, 40, 40))
    image.save(path)
    return path


def _prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_checkpoint_config_and_tokenizer_are_the_7bs(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (3584, 28, 4)
    assert (text["intermediate_size"], text["vocab_size"], text["num_hidden_layers"]) == (18944, 152064, 2)
    assert text["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert text["rope_parameters"]["rope_theta"] == 1e6
    assert (vision["hidden_size"], vision["num_heads"], vision["depth"]) == (1280, 16, 4)
    assert (vision["fullatt_block_indexes"], vision["out_hidden_size"]) == ([3], 3584)
    assert (cfg["image_token_id"], cfg["vision_start_token_id"]) == (151655, 151652)
    processor = load_processor(SPEC)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert processor.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}


def test_hf_and_vllm_agree_on_log_probs(checkpoint, tmp_path):
    from repic_ray.rollout.config import RolloutConfig, SamplingConfig
    from repic_ray.rollout.types import RolloutRequest
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    processor = load_processor(SPEC)
    prompt, image = _prompt(processor), _image(tmp_path / "q.png")
    engine = VLLMRolloutEngine(RolloutConfig(
        model=str(checkpoint), dtype="bfloat16", enable_lora=False, max_model_len=2048,
        max_num_batched_tokens=2048, max_num_seqs=2, kv_cache_gib=0.25, limit_images_per_prompt=1))
    try:
        [result] = engine.generate([RolloutRequest("q", prompt, [str(image)], n=1)],
                                   SamplingConfig(n=1, temperature=1.0, max_tokens=6, seed=0))
    finally:
        engine.close()
    completion = result.completions[0]
    assert len(completion.token_ids) == 6

    model = load_policy(SPEC, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) > 1.5e9
    inputs = qwen_mm_inputs(processor, prompt + processor.tokenizer.decode(completion.token_ids),
                            [Image.open(image)])
    ids = torch.cat([qwen_mm_inputs(processor, prompt, [Image.open(image)])["input_ids"][0],
                     torch.tensor(completion.token_ids)])
    inputs["input_ids"] = ids[None]
    inputs["attention_mask"] = torch.ones_like(ids)[None]
    inputs["mm_token_type_ids"] = (ids == 151655).long()[None]
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    n = len(completion.token_ids)
    logp = torch.log_softmax(logits[-n - 1:-1], -1)
    # vLLM blocks the vision special tokens (-100 bias); renormalise HF the same way
    blocked = [151652, 151653, 151654, 151655, 151656]
    logp[:, blocked] = -torch.inf
    logp = torch.log_softmax(logp, -1)
    hf = logp.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    diff = (hf - torch.tensor(completion.logprobs)).abs()
    assert diff.mean() < 2e-2, (hf, completion.logprobs)
