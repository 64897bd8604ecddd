"""Pieces shared by the vLLM and Hugging Face rollout engines."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from repic_ray.rollout.config import SamplingConfig
from repic_ray.rollout.types import RolloutRequest

IMAGE_PLACEHOLDER = "<|image_pad|>"


def vision_token_ids(tokenizer: Any) -> list[int]:
    """Ids never to sample: a random (or badly trained) policy samples vision special tokens,
    and a sampled `<|image_pad|>` breaks the image-token count of any prompt it lands in."""
    from repic_ray.models.loading import vision_special_token_ids

    return vision_special_token_ids(tokenizer)


def num_samples(request: RolloutRequest, sampling: SamplingConfig) -> int:
    n = sampling.n if request.n is None else request.n
    if n < 1:
        raise ValueError(f"request {request.uid!r}: n must be >= 1, got {n}")
    return n


def request_seed(base_seed: int, uid: str) -> int:
    """A per-request seed from the base seed and the uid, independent of batch order.

    vLLM gives sample i of a request the seed `seed + i`; spacing requests by a hash keeps
    two requests from sharing seeds unless their uids collide."""
    return (base_seed * 1_000_003 + zlib.crc32(uid.encode())) % (2**31 - 2**16)


def validate_requests(requests: list[RolloutRequest], max_images: int) -> None:
    """Fail early, naming the request, on duplicate uids and placeholder/image mismatches."""
    seen: set[str] = set()
    for r in requests:
        if r.uid in seen:
            raise ValueError(f"duplicate request uid {r.uid!r}")
        seen.add(r.uid)
        placeholders = r.prompt_text.count(IMAGE_PLACEHOLDER)
        if placeholders != len(r.image_paths):
            raise ValueError(
                f"request {r.uid!r}: prompt_text has {placeholders} image placeholder(s) "
                f"({IMAGE_PLACEHOLDER}) but {len(r.image_paths)} image path(s) were given"
            )
        if len(r.image_paths) > max_images:
            raise ValueError(
                f"request {r.uid!r}: {len(r.image_paths)} images exceed "
                f"rollout.limit_images_per_prompt={max_images}"
            )


def load_images(request: RolloutRequest) -> list[Image.Image]:
    images = []
    for path in request.image_paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"request {request.uid!r}: cannot read image {path!r}: {exc}") from exc
    return images


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def write_peft_adapter(
    directory: Path, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]
) -> None:
    """Write an adapter exactly as peft's `save_pretrained` does (safetensors + config json)."""
    from safetensors.torch import save_file

    if not tensors:
        raise ValueError("update_lora: no LoRA tensors given")
    bad = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if bad:
        raise ValueError(
            "update_lora: tensor names must be peft adapter names (…lora_A.weight / "
            f"…lora_B.weight), got e.g. {bad[:3]}"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in peft_config:
            raise ValueError(f"update_lora: peft_config lacks {key!r}")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **_jsonable(peft_config)}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in obj]
        return sorted(items) if isinstance(obj, (set, frozenset)) else items
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums
        return obj.value
    return obj


# transformers >= 4.52 keeps Qwen-VL's language model under `model.language_model.` and its
# vision tower under `model.visual.`; checkpoints on disk use `model.` / `visual.`. vLLM's
# loader accepts both, so both namings are valid in a full-weight update.
_IN_MEMORY_TO_CHECKPOINT = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_name(name: str) -> str:
    """The on-disk name of an in-memory transformers parameter name."""
    for new, old in _IN_MEMORY_TO_CHECKPOINT:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def checkpoint_parameter_names(model_dir: str) -> set[str] | None:
    """Tensor names a local safetensors checkpoint accepts, in both namings (on disk and
    transformers in memory); None if `model_dir` is not a local safetensors checkpoint."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    for new, old in _IN_MEMORY_TO_CHECKPOINT:
        names |= {new + n[len(old) :] for n in list(names) if n.startswith(old)}
    return names


def check_full_state_dict(state_dict: dict[str, torch.Tensor], known: set[str] | None) -> None:
    if not state_dict:
        raise ValueError("update_full: empty state dict")
    if known is None:
        return
    unknown = sorted(set(state_dict) - known)
    if unknown:
        raise ValueError(
            f"update_full: {len(unknown)} parameter name(s) not in the checkpoint "
            f"(Hugging Face naming expected), e.g. {unknown[:3]}"
        )
