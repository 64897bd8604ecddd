"""One loading path for tiny and real checkpoints.

A checkpoint *spec* is either `tiny:<model>` (optionally `tiny:<model>@seed=N`), which
builds or reuses a cached random checkpoint from `repic_ray.models.tiny`, or anything
`from_pretrained` accepts: a local directory or a hub id such as
`Qwen/Qwen2.5-VL-7B-Instruct`, `IDEA-Research/grounding-dino-tiny` or
`openai/clip-vit-large-patch14-336`. After `resolve_checkpoint` both kinds go through
the same `from_pretrained` calls, so the tiny models exercise the real code.

A relative path that does not exist from the working directory is looked up in the
project root too, so the checkpoints shipped in the repository (`checkpoints/tiny-clip`,
`checkpoints/tiny-gdino`, `checkpoints/tiny-sft`) load from anywhere, e.g. in a Ray
worker whose working directory is elsewhere.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from repic_ray.models import shapes, tiny

TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2.5-vl": tiny.build_tiny_qwen2_5_vl,
    "qwen2.5-vl-7b-shapes": shapes.build_qwen2_5_vl_7b_shapes,
    "grounding-dino": tiny.build_tiny_grounding_dino,
    "clip": tiny.build_tiny_clip,
}
# Qwen2.5-VL's vision special tokens. A random or weakly trained policy samples them
# (a random tiny model does), and a sampled <|image_pad|> breaks the image-token count of
# any later prompt that contains the text, so rollout engines forbid all of them.
VISION_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_TINY_SPEC = re.compile(r"tiny:(?P<model>[\w.-]+)(?:@seed=(?P<seed>\d+))?")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: where `checkpoints/` (the shipped trained checkpoints) lives."""
SHIPPED_CLIP = "checkpoints/tiny-clip"
"""The tiny CLIP trained on the synthetic world (`repic_ray.models.perception`)."""
SHIPPED_DETECTOR = "checkpoints/tiny-gdino"
"""The tiny Grounding DINO trained on the synthetic world (`repic_ray.models.perception`)."""
# `org/name` as the hub spells repository ids (a path that does not exist and has this
# shape is taken for one; anything else that does not exist is a missing directory).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_checkpoint(spec: str) -> str:
    """`tiny:...` -> the cached tiny checkpoint directory; a local path or hub id as is
    (a relative path missing from the working directory: under `PROJECT_ROOT` if there).

    Raises `ValueError` for an unknown tiny model and `FileNotFoundError` for a path that
    does not exist and cannot be a hub id (e.g. `./ckpt`, `/models/qwen`, `ckpt`).
    """
    if spec.startswith("tiny:"):
        match = _TINY_SPEC.fullmatch(spec)
        if match is None or match["model"] not in TINY_BUILDERS:
            raise ValueError(
                f"unknown tiny checkpoint {spec!r}; expected tiny:<model>[@seed=N] with "
                f"<model> one of {sorted(TINY_BUILDERS)}"
            )
        seed = int(match["seed"] or 0)
        return str(TINY_BUILDERS[match["model"]](seed=seed))
    if Path(spec).exists():
        return spec
    if not Path(spec).is_absolute() and (PROJECT_ROOT / spec).exists():
        return str(PROJECT_ROOT / spec)
    if _HUB_ID.fullmatch(spec):
        return spec
    raise FileNotFoundError(
        f"checkpoint {spec!r} is not an existing path, a hub id (org/name) or tiny:<model>"
    )


@contextlib.contextmanager
def _explain_missing(spec: str, path: str) -> Iterator[None]:
    """Name the checkpoint and the way out when a hub id cannot be fetched (offline, or
    not cached); transformers' own message names neither."""
    try:
        yield
    except OSError as err:
        if Path(path).exists():
            raise
        from huggingface_hub import constants

        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if constants.HF_HUB_OFFLINE
            else "downloading it failed"
        )
        raise OSError(
            f"cannot load checkpoint {spec!r}: it is not a local directory, the Hugging Face "
            f"cache does not have it and {why}. Download it beforehand (`hf download "
            f"{spec}`), point HF_HOME at a cache that has it, or pass a local directory."
        ) from err


def load_processor(spec: str, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's `AutoProcessor`; `min_pixels`/`max_pixels` override a Qwen-VL
    image (and video) processor's resize bounds, `size.shortest_edge`/`longest_edge`.

    The bounds go in as `size`: transformers 5.19 keeps `min_pixels=`/`max_pixels=`
    given to `from_pretrained` as call-time arguments, deprecated and warned on every call.
    """
    from transformers import AutoProcessor

    path = resolve_checkpoint(spec)
    with _explain_missing(spec, path):
        processor = AutoProcessor.from_pretrained(path)
        if min_pixels is None and max_pixels is None:
            return processor
        size = processor.image_processor.size
        size = {
            "shortest_edge": size["shortest_edge"] if min_pixels is None else min_pixels,
            "longest_edge": size["longest_edge"] if max_pixels is None else max_pixels,
        }
        return AutoProcessor.from_pretrained(path, size=size)


def load_policy(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """`Qwen2_5_VLForConditionalGeneration` in eval mode (`"sdpa"` or `"eager"` attention)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = resolve_checkpoint(spec)
    with _explain_missing(spec, path):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.to(device).eval()


def load_detector(spec: str):
    """`(processor, GroundingDinoForObjectDetection)` in eval mode."""
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    path = resolve_checkpoint(spec)
    with _explain_missing(spec, path):
        processor = AutoProcessor.from_pretrained(path)
        model = GroundingDinoForObjectDetection.from_pretrained(path)
    return processor, model.eval()


def load_clip(spec: str):
    """`(processor, CLIPModel)` in eval mode."""
    from transformers import AutoProcessor, CLIPModel

    path = resolve_checkpoint(spec)
    with _explain_missing(spec, path):
        processor = AutoProcessor.from_pretrained(path)
        model = CLIPModel.from_pretrained(path)
    return processor, model.eval()


def vision_special_token_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of `VISION_SPECIAL_TOKENS` that `tokenizer` (or a processor's) has."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab)


def qwen_mm_inputs(
    processor: Any, text: str | Sequence[str], images: Sequence[Any] | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL processor outputs as tensors, always with `mm_token_type_ids`.

    transformers 5.19's Qwen2.5-VL builds its 3D M-RoPE positions only when
    `mm_token_type_ids` (1 on image tokens, 2 on video tokens) is passed to the forward
    and to `generate`; without it the model silently falls back to 1D positions and its
    log-probs drift from vLLM's. The installed processor returns it by default
    (`return_mm_token_type_ids=True`); this helper asks for it explicitly and fills it in
    from the image/video token ids if a processor does not.

    `images` are all the images of the batch, in the order their placeholders appear in
    `text` (a list of prompts is padded on the tokenizer's `padding_side`). `kwargs` go
    to the processor.
    """
    texts = [text] if isinstance(text, str) else list(text)
    kwargs.setdefault("padding", len(texts) > 1)
    enc = processor(
        text=texts,
        images=list(images) if images else None,
        return_tensors="pt",
        return_mm_token_type_ids=True,
        **kwargs,
    )
    out = dict(enc)
    if "mm_token_type_ids" not in out:
        ids = out["input_ids"]
        out["mm_token_type_ids"] = (ids == processor.image_token_id).long() + 2 * (
            ids == processor.video_token_id
        ).long()
    return out
