"""Caption engines: the RePIC prompt, model versions, and vLLM's async engine
against HF `generate` on the tiny Qwen2.5-VL with a LoRA adapter."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

from repic_ray.models.loading import load_processor, resolve_checkpoint
from repic_ray.serving.captioner import (
    CaptionerConfig,
    HFCaptioner,
    VLLMCaptioner,
    _VisibleText,
    caption_text,
    engine_kwargs,
    model_version,
    prompt_images,
)
from repic_ray.serving.types import ReferenceConcept


def png(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


REFS = [ReferenceConcept("Bo", "dog", "", [png("red"), png("orange")]),
        ReferenceConcept("Mia", "cat", "", [png("blue")])]


def test_prompt_puts_named_references_before_the_query():
    processor = load_processor("tiny:qwen2.5-vl")
    text = caption_text(REFS, processor)
    # 3 reference images + the query, each one vision block.
    assert text.count("<|vision_start|>") == 4
    assert text.index("This is <Bo>.") < text.index("This is <Mia>.")
    last_image = text.rindex("<|vision_end|>")
    assert last_image > text.index("This is <Mia>.")
    assert "Output the final answer including its name." in text[last_image:]
    images = prompt_images(png("green", (900, 900)), REFS, max_pixels=448 * 448)
    assert len(images) == 4 and images[-1].size == (448, 448)


def test_engine_memory_is_explicit_and_validated():
    # The KV cache is sized by the config, never by the machine's free RAM or an
    # environment variable: 0.5 GiB -> 0.5 * 2**30 bytes.
    kwargs = engine_kwargs(CaptionerConfig(kv_cache_gib=0.5, max_model_len=2048))
    assert kwargs["kv_cache_memory_bytes"] == 2**29
    assert kwargs["max_num_batched_tokens"] == 8192  # max(max_model_len, 8192)
    gpu = engine_kwargs(CaptionerConfig(kv_cache_gib=None, gpu_memory_utilization=0.6))
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.6
    for bad, field_name in (({"kv_cache_gib": 0}, "kv_cache_gib"),
                            ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
                            ({"max_num_batched_tokens": 100}, "max_num_batched_tokens")):
        with pytest.raises(ValueError, match=f"captioner.{field_name}"):
            CaptionerConfig(**bad)


def test_streamed_pieces_join_to_the_stripped_caption():
    visible = _VisibleText()
    # The engine's cumulative text: leading space dropped, trailing space held back
    # until more text comes, dropped at the end.
    steps = [(" ", False), (" Bo", False), (" Bo ", False), (" Bo naps", False),
             (" Bo naps \n", True)]
    pieces = [visible.piece(text, final) for text, final in steps]
    assert pieces == ["", "Bo", "", " naps", ""]
    assert "".join(pieces) == visible.sent == " Bo naps \n".strip()


def test_model_version_names_checkpoint_and_adapter(tmp_path):
    assert model_version(CaptionerConfig(checkpoint="/ckpts/qwen-rl/")) == "qwen-rl"
    adapter = tmp_path / "lora-step100"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    version = model_version(CaptionerConfig(checkpoint="/ckpts/base", adapter=str(adapter)))
    assert version.startswith("base+lora-step100@") and len(version.split("@")[1]) == 12
    assert model_version(CaptionerConfig(model_version="v7")) == "v7"
    with pytest.raises(ValueError, match="captioner.max_new_tokens"):
        CaptionerConfig(max_new_tokens=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with non-zero B, so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(resolve_checkpoint("tiny:qwen2.5-vl"))
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_vllm_async_matches_hf_generate_with_adapter(adapter_dir):
    cfg = CaptionerConfig(adapter=adapter_dir, max_new_tokens=12, max_model_len=2048,
                          max_lora_rank=8)
    queries = [png(c, (84, 84)) for c in ("red", "blue", "green")]
    hf = HFCaptioner(cfg)
    expected = [hf.caption(q, REFS).caption for q in queries]
    base = HFCaptioner(CaptionerConfig(max_new_tokens=12)).caption(queries[0], REFS).caption
    assert base != expected[0]  # the adapter matters

    async def run() -> list[str]:
        engine = VLLMCaptioner(cfg)
        try:
            results = await asyncio.gather(*[engine.caption(q, REFS) for q in queries])
        finally:
            engine.shutdown()
        return [r.caption for r in results]

    assert asyncio.run(run()) == expected
