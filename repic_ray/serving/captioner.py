"""Caption a query image given a user's reference concepts (RePIC-style prompt).

Two engines with one interface, `caption(query_bytes, concepts, options) -> CaptionResult`
(the vLLM engine also streams: `caption_stream` yields `CaptionDelta`s):

- `VLLMCaptioner`: vLLM's async engine (`AsyncLLM`), so concurrent requests are
  batched continuously; with a LoRA adapter it serves base + adapter.
- `HFCaptioner`: transformers `generate`, one request at a time; the baseline of
  `bench/bench_serving.py` and the in-process engine of the API tests.

Both build the same prompt (`repic_ray.prompts.caption_prompt`): each reference
image followed by its concept's name, then the query image and the question.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from repic_ray.data.images import image_from_bytes
from repic_ray.models.loading import (
    load_processor,
    resolve_checkpoint,
    vision_special_token_ids,
)
from repic_ray.ports import pin_vllm_port
from repic_ray.prompts import NAME_SUFFIX, caption_prompt
from repic_ray.serving.types import (
    CaptionDelta,
    CaptionOptions,
    CaptionResult,
    ModelInfo,
    ReferenceConcept,
)


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
    kv_cache_gib: float | None = 1.0
    """KV cache each vLLM replica reserves, in GiB (vLLM `kv_cache_memory_bytes`).
    None: vLLM sizes it from `gpu_memory_utilization` instead (on CPU that fraction
    of the machine's whole RAM, which a shared machine rarely has free)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the accelerator's memory vLLM may use when `kv_cache_gib` is None."""
    max_num_batched_tokens: int | None = None
    """Tokens vLLM prefills per step; None: the longest prompt (`max_model_len`) or
    8192, whichever is larger, so a whole prompt is prefilled in one step."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("captioner.checkpoint: must name a checkpoint")
        for name in ("max_new_tokens", "max_model_len", "max_images", "max_num_seqs",
                     "image_max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"captioner.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"captioner.dtype: unknown dtype {self.dtype!r}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"captioner.kv_cache_gib: must be > 0 or null, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("captioner.gpu_memory_utilization: must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"captioner.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"captioner.max_model_len ({self.max_model_len}): a prompt is prefilled in one step")


def engine_kwargs(config: CaptionerConfig) -> dict:
    """Arguments of vLLM's `AsyncEngineArgs` for this config, the checkpoint excepted."""
    kwargs = {
        "dtype": config.dtype,
        "enforce_eager": True,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens or max(config.max_model_len, 8192),
        "limit_mm_per_prompt": {"image": config.max_images},
        "enable_lora": bool(config.adapter),
        "max_lora_rank": config.max_lora_rank,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "disable_log_stats": True,
    }
    if config.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * (1 << 30))
    return kwargs


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


def caption_text(concepts: list[ReferenceConcept], processor, question: str = "") -> str:
    """The rendered RePIC prompt: every reference image followed by "This is <name>.",
    then the query image and the caption question (`repic_ray.prompts`, the same
    layout the model was trained on). Images are placeholders here; the engines get
    the decoded images in the same order from `prompt_images`. An empty `question`
    is the default caption question, with the name suffix when concepts are given."""
    refs = [(f"{c.name}#{i}", c.name) for c in concepts for i in range(len(c.images))]
    if question:
        return caption_prompt("query", refs, processor, question=question).text
    suffix = NAME_SUFFIX if concepts else ""
    return caption_prompt("query", refs, processor, suffix=suffix).text


class _VisibleText:
    """Turns an engine's growing output into stream pieces whose concatenation is the
    stripped caption: leading whitespace is dropped, trailing whitespace held back
    until more text follows (or dropped at the end). Engine text only grows by
    appending (incremental detokenization), so a piece is never taken back."""

    def __init__(self) -> None:
        self.sent = ""

    def piece(self, text: str, final: bool) -> str:
        visible = text.strip() if final else text.lstrip().rstrip()
        if len(visible) <= len(self.sent):
            return ""
        piece, self.sent = visible[len(self.sent):], visible
        return piece


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


class VLLMCaptioner:
    """Captions with vLLM's async engine (continuous batching across requests)."""

    def __init__(self, config: CaptionerConfig):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.path = resolve_checkpoint(config.checkpoint)
        self.version = model_version(config)
        self.processor = load_processor(self.path)
        self.blocked = vision_special_token_ids(self.processor)
        args = AsyncEngineArgs(model=self.path, **engine_kwargs(config))
        pin_vllm_port()
        try:
            self.engine = AsyncLLM.from_engine_args(args)
        except RuntimeError as exc:
            # vLLM reports the engine process's own error in its log, not in this exception.
            memory = (f"captioner.kv_cache_gib={config.kv_cache_gib}" if config.kv_cache_gib
                      else f"captioner.gpu_memory_utilization={config.gpu_memory_utilization}")
            raise RuntimeError(
                f"the vLLM caption engine did not start ({exc}); vLLM's reason is in the log "
                f"above (a memory error: lower {memory}, captioner.max_model_len or "
                "captioner.max_num_seqs)") from exc
        self.created = int(time.time())
        self.lora = None
        if config.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(Path(config.adapter).resolve()))

    def model_info(self) -> ModelInfo:
        return ModelInfo(id=self.version, max_tokens=self.config.max_new_tokens,
                         created=self.created)

    async def caption_stream(self, query: bytes, concepts: list[ReferenceConcept],
                             options: CaptionOptions | None = None
                             ) -> AsyncIterator[CaptionDelta]:
        """The caption as it is generated; the last delta carries the whole result."""
        from vllm import SamplingParams

        options = (options or CaptionOptions()).checked(self.config.max_new_tokens)
        images = prompt_images(query, concepts, self.config.image_max_pixels)
        text = caption_text(concepts, self.processor, options.question)
        params = SamplingParams(
            temperature=options.temperature, top_p=options.top_p, seed=options.seed,
            max_tokens=options.max_tokens or self.config.max_new_tokens,
            logit_bias={t: -100.0 for t in self.blocked},
        )
        visible = _VisibleText()
        async for out in self.engine.generate(
            {"prompt": text, "multi_modal_data": {"image": images}}, params,
            request_id=uuid.uuid4().hex, lora_request=self.lora,
        ):
            completion = out.outputs[0]
            piece = visible.piece(completion.text, out.finished)
            if out.finished:
                yield CaptionDelta(piece, CaptionResult(
                    caption=visible.sent, model=self.version,
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason or "stop"))
            elif piece:
                yield CaptionDelta(piece)

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options: CaptionOptions | None = None) -> CaptionResult:
        result = None
        async for delta in self.caption_stream(query, concepts, options):
            result = delta.result or result
        return result

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            # Collect it now: AsyncLLM.__del__ shuts down again, which fails if it
            # only runs at interpreter exit (module globals already cleared).
            del engine


class HFCaptioner:
    """Captions with transformers `generate` (greedy), one request at a time."""

    def __init__(self, config: CaptionerConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        self.config = config
        self.path = resolve_checkpoint(config.checkpoint)
        self.version = model_version(config)
        self.processor = load_processor(self.path)
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=getattr(torch, config.dtype))
        if config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.adapter)
        self.model = model.eval()
        self.blocked = vision_special_token_ids(self.processor)
        self.created = int(time.time())
        self._lock = threading.Lock()

    def model_info(self) -> ModelInfo:
        return ModelInfo(id=self.version, max_tokens=self.config.max_new_tokens,
                         created=self.created)

    def caption(self, query: bytes, concepts: list[ReferenceConcept],
                options: CaptionOptions | None = None) -> CaptionResult:
        import torch

        options = (options or CaptionOptions()).checked(self.config.max_new_tokens)
        max_tokens = options.max_tokens or self.config.max_new_tokens
        sampling = ({"do_sample": True, "temperature": options.temperature,
                     "top_p": options.top_p} if options.temperature > 0 else
                    {"do_sample": False})
        images = prompt_images(query, concepts, self.config.image_max_pixels)
        text = caption_text(concepts, self.processor, options.question)
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        with self._lock, torch.no_grad():
            base = getattr(self.model, "base_model", self.model)
            inner = getattr(base, "model", None)
            if inner is not None and hasattr(inner, "rope_deltas"):
                inner.rope_deltas = None  # stale M-RoPE offsets from the last request
            if options.seed is not None and options.temperature > 0:
                torch.manual_seed(options.seed)  # generate draws from the global RNG
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, **sampling,
                bad_words_ids=[[t] for t in self.blocked] or None,
            )
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        caption = self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        # One sequence: generate stops at EOS without padding.
        ended = bool(new) and new[-1] in eos or len(new) < max_tokens
        return CaptionResult(
            caption=caption, model=self.version,
            prompt_tokens=int(inputs["input_ids"].shape[1]), completion_tokens=len(new),
            finish_reason="stop" if ended else "length")
