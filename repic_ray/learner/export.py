"""Weights out of a training model, without touching it.

Both exports work in every ZeRO stage: parameters are gathered a module at a time
with `deepspeed.zero.GatheredParameters(..., modifier_rank=None)` (read-only; a
no-op for unpartitioned parameters), copied, and released. Under ZeRO-3, peft's
`save_pretrained` would otherwise write empty `[0]` tensors.

The merged export computes `W + scaling * B @ A` per LoRA module in fp32 instead of
calling peft's merge/unmerge: under ZeRO-2 bf16 that round trip permanently perturbs
the frozen base weights, whereas this leaves the model bit-identical.
"""

from __future__ import annotations

import enum
from typing import Any

import deepspeed
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer


def _gathered(params: list[torch.nn.Parameter]):
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def lora_state_dict(
    model: PeftModel, adapter: str = "default"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter as `save_pretrained` writes it: (tensors, adapter_config dict).

    Keys look like `base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`.
    """
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    with _gathered(params):
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        tensors = {k: _copy(v) for k, v in state.items()}
    for key, value in tensors.items():
        if value.numel() == 0:
            raise RuntimeError(
                f"export_lora: {key} is empty after gathering (ZeRO-3 partition not gathered)"
            )
    config = _jsonable(model.peft_config[adapter].to_dict())
    config["inference_mode"] = True
    return tensors, config


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _merged_lora_module(layer: LoraLayer, adapter: str) -> dict[str, torch.Tensor]:
    base = layer.get_base_layer()
    if adapter not in layer.lora_A:
        raise ValueError(f"LoRA layer has no adapter {adapter!r}")
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise NotImplementedError("export_full does not merge DoRA adapters")
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    params = [base.weight, A, B] + ([base.bias] if getattr(base, "bias", None) is not None else [])
    out: dict[str, torch.Tensor] = {}
    with _gathered(params):
        W = base.weight
        delta = (B.detach().float() @ A.detach().float()) * float(layer.scaling[adapter])
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        out["weight"] = (W.detach().float() + delta).to(W.dtype).cpu().contiguous()
        if getattr(base, "bias", None) is not None:
            out["bias"] = _copy(base.bias)
    return out


def merged_state_dict(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """State dict of the plain model with every LoRA update folded in.

    `model` is the Hugging Face model inside the peft wrapper (LoRA layers injected
    in place) or a plain model (full fine-tuning: its own weights). Keys and order are
    those of the plain model's `state_dict()` (`.base_layer` and `lora_*` removed),
    tied weights included under each of their names.
    """
    layers = _lora_layers(model)
    inside_lora = {
        sub
        for name, layer in layers.items()
        for sub, _ in layer.named_modules(prefix=name)
        if sub != name
    }
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in inside_lora:
            continue
        prefix = f"{name}." if name else ""
        if name in layers:
            for key, value in _merged_lora_module(layers[name], adapter).items():
                out[prefix + key] = value
            continue
        own = list(module.named_parameters(recurse=False))
        with _gathered([p for _, p in own]):
            for pname, p in own:
                out[prefix + pname] = _copy(p)
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = _copy(buf)

    # The plain model's key set and order, from the model's own state_dict keys.
    keys = list(
        dict.fromkeys(
            key.replace(".base_layer.", ".")
            for key in model.state_dict(keep_vars=True)
            if ".lora_" not in key
        )
    )
    missing = [k for k in keys if k not in out]
    extra = [k for k in out if k not in set(keys)]
    if missing or extra:
        raise RuntimeError(
            f"merged_state_dict: key mismatch, missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return {k: out[k] for k in keys}
