"""Caption a query image given a user's reference concepts (RePIC-style prompt).

Two engines with one interface, `caption(query_bytes, concepts) -> CaptionResult`:

- `VLLMCaptioner`: vLLM's async engine (`AsyncLLM`), so concurrent requests are
  batched continuously; with a LoRA adapter it serves base + adapter.
- `HFCaptioner`: transformers `generate`, one request at a time; the baseline of
  `bench/bench_serving.py` and the in-process engine of the API tests.

Both build the same prompt: each concept's reference image(s), each followed by
its name and description, then the query image and the instruction (images come
before the text they are about, as in RePIC's multi-image prompts).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from repic_ray.data.images import image_from_bytes
from repic_ray.serving.types import CaptionResult, ReferenceConcept

INSTRUCTION = "Give a personalized caption of the last image."
NO_CONCEPT_INSTRUCTION = "Give a caption of the image."


@dataclass
class CaptionerConfig:
    """The captioning model and its decoding settings."""

    checkpoint: str = "tiny:qwen2.5-vl"
    """A Qwen2.5-VL checkpoint directory (or hub id available offline), or
    `tiny:qwen2.5-vl` for the random tiny test model."""
    adapter: str = ""
    """Directory of a peft LoRA adapter trained on `checkpoint`; empty for none."""
    model_version: str = ""
    """Version string reported with each caption; derived from the checkpoint and
    adapter names (plus a hash of the adapter weights) when empty."""
    max_new_tokens: int = 64
    """Caption length limit, in tokens."""
    max_model_len: int = 4096
    """Context length the engine reserves per sequence."""
    max_images: int = 21
    """Images per prompt the engine accepts (references of every concept + query)."""
    max_lora_rank: int = 64
    """Largest LoRA rank the vLLM engine accepts."""
    max_num_seqs: int = 16
    """Sequences vLLM batches together."""
    dtype: str = "float32"
    """Model dtype ("float32" or "bfloat16")."""
    image_max_pixels: int = 448 * 448
    """Images are downscaled to at most this many pixels before prompting."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("captioner.checkpoint: must name a checkpoint")
        for name in ("max_new_tokens", "max_model_len", "max_images", "max_num_seqs",
                     "image_max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"captioner.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"captioner.dtype: unknown dtype {self.dtype!r}")


def resolve_model_path(spec: str) -> str:
    """`tiny:qwen2.5-vl` -> the cached tiny checkpoint; anything else unchanged."""
    if spec == "tiny:qwen2.5-vl":
        from repic_ray.models.tiny import build_tiny_qwen2_5_vl

        return str(build_tiny_qwen2_5_vl())
    if spec.startswith("tiny:"):
        raise ValueError(f"captioner.checkpoint: unknown tiny model {spec!r}")
    return spec


def model_version(config: CaptionerConfig) -> str:
    if config.model_version:
        return config.model_version
    version = Path(config.checkpoint.rstrip("/")).name or config.checkpoint
    if config.adapter:
        adapter = Path(config.adapter)
        weights = adapter / "adapter_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.exists() else ""
        version += f"+{adapter.name}" + (f"@{digest}" if digest else "")
    return version


def caption_messages(concepts: list[ReferenceConcept]) -> list[dict]:
    """Chat messages for one caption: reference images with their names, then the query."""
    content: list[dict] = []
    for c in concepts:
        for _ in c.images:
            content.append({"type": "image"})
        desc = f"<{c.name}> is a {c.category}" + (f": {c.info}" if c.info else "") + "."
        content.append({"type": "text", "text": f"{desc}\n"})
    content.append({"type": "image"})
    text = INSTRUCTION if concepts else NO_CONCEPT_INSTRUCTION
    if concepts:
        text += " Output the final answer including its name."
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def prompt_images(query: bytes, concepts: list[ReferenceConcept], max_pixels: int
                  ) -> list[Image.Image]:
    """Decoded images in prompt order (references, then the query), downscaled."""
    images = [image_from_bytes(b, name=f"reference of {c.name}")
              for c in concepts for b in c.images]
    images.append(image_from_bytes(query, name="query"))
    return [_fit(img, max_pixels) for img in images]


def _fit(img: Image.Image, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w * h <= max_pixels:
        return img
    scale = (max_pixels / (w * h)) ** 0.5
    return img.resize((max(28, int(w * scale)), max(28, int(h * scale))), Image.BICUBIC)


def _blocked_token_ids(tokenizer) -> list[int]:  # noqa: ANN001
    """Vision special tokens, which a random or lightly trained model may sample."""
    ids = []
    for tok in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.append(tid)
    return ids


class VLLMCaptioner:
    """Captions with vLLM's async engine (continuous batching across requests)."""

    def __init__(self, config: CaptionerConfig):
        from transformers import AutoProcessor
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.path = resolve_model_path(config.checkpoint)
        self.version = model_version(config)
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.blocked = _blocked_token_ids(self.processor.tokenizer)
        args = AsyncEngineArgs(
            model=self.path,
            dtype=config.dtype,
            enforce_eager=True,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_model_len, 8192),
            limit_mm_per_prompt={"image": config.max_images},
            enable_lora=bool(config.adapter),
            max_lora_rank=config.max_lora_rank,
            disable_log_stats=True,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.lora = None
        if config.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(Path(config.adapter).resolve()))

    async def caption(self, query: bytes, concepts: list[ReferenceConcept]) -> CaptionResult:
        from vllm import SamplingParams

        images = prompt_images(query, concepts, self.config.image_max_pixels)
        text = self.processor.apply_chat_template(
            caption_messages(concepts), tokenize=False, add_generation_prompt=True)
        params = SamplingParams(
            temperature=0.0, max_tokens=self.config.max_new_tokens,
            logit_bias={t: -100.0 for t in self.blocked},
        )
        final = None
        async for out in self.engine.generate(
            {"prompt": text, "multi_modal_data": {"image": images}}, params,
            request_id=uuid.uuid4().hex, lora_request=self.lora,
        ):
            final = out
        return CaptionResult(caption=final.outputs[0].text.strip(), model=self.version)

    def shutdown(self) -> None:
        self.engine.shutdown()


class HFCaptioner:
    """Captions with transformers `generate` (greedy), one request at a time."""

    def __init__(self, config: CaptionerConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.path = resolve_model_path(config.checkpoint)
        self.version = model_version(config)
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=getattr(torch, config.dtype))
        if config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.adapter)
        self.model = model.eval()
        self.blocked = _blocked_token_ids(self.processor.tokenizer)
        self._lock = threading.Lock()

    def caption(self, query: bytes, concepts: list[ReferenceConcept]) -> CaptionResult:
        import torch

        images = prompt_images(query, concepts, self.config.image_max_pixels)
        text = self.processor.apply_chat_template(
            caption_messages(concepts), tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        with self._lock, torch.no_grad():
            base = getattr(self.model, "base_model", self.model)
            inner = getattr(base, "model", None)
            if inner is not None and hasattr(inner, "rope_deltas"):
                inner.rope_deltas = None  # stale M-RoPE offsets from the last request
            out = self.model.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                bad_words_ids=[[t] for t in self.blocked] or None,
            )
        new = out[0, inputs["input_ids"].shape[1]:]
        caption = self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        return CaptionResult(caption=caption, model=self.version)
