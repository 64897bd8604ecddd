"""A shape-faithful Qwen2.5-VL-7B-Instruct, built offline.

Every width, head count, vocabulary size, special-token id, RoPE / M-RoPE setting and
vision-tower setting is Qwen2.5-VL-7B-Instruct's own (its `config.json` and processor
settings, reproduced in `repic_ray.models.known`); only the depth is reduced (by default 2
language layers and 4 vision blocks, the last a full-attention block, the others window
attention). Weights are random (the model's own initialisation, saved in bf16 like the
real checkpoint). The tokenizer is the world's byte-level BPE padded with unused entries
so that Qwen's 22 added tokens sit at their real ids (`<|endoftext|>` 151643 ...
`<|image_pad|>` 151655); the embedding has the real 152,064 rows.

It exercises what a tiny model cannot: the 7B recipe's memory and kernel shapes (hidden
3584, GQA 28/4 heads of 128, MLP 18944, a 152k-row lm_head, the 1280-wide vision tower
with window attention and its 3584-wide merger), the real LoRA module names and widths,
and token ids above 150k. With the defaults it has ~1.6 B parameters (~3.3 GB on disk).

    path = build_qwen2_5_vl_7b_shapes()          # or the spec "tiny:qwen2.5-vl-7b-shapes"
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

import tokenizers
import torch
import transformers

from repic_ray.models import tiny
from repic_ray.models.known import SHAPES_TEXT_LAYERS, SHAPES_VISION_DEPTH, shapes_config

# Its preprocessor_config.json's resize bounds (56x56 px to 3584x3584 px).
QWEN2_5_VL_7B_MIN_PIXELS = 3136
QWEN2_5_VL_7B_MAX_PIXELS = 12845056
# Qwen2.5's BPE has 151,643 entries; the added tokens follow at 151643..151664.
QWEN_BPE_SIZE = 151643


def padded_qwen_tokenizer() -> tokenizers.Tokenizer:
    """The world's BPE (`tiny.train_qwen_tokenizer`) padded with never-produced entries
    `<|unused_N|>` to Qwen2.5's 151,643 BPE ids, then Qwen's added tokens at their real
    ids. Text encodes exactly as with the small tokenizer."""
    raw = json.loads(tiny.train_qwen_tokenizer().to_str())
    vocab = raw["model"]["vocab"]
    for i in range(len(vocab), QWEN_BPE_SIZE):
        vocab[f"<|unused_{i}|>"] = i
    for i, token in enumerate(raw["added_tokens"]):
        token["id"] = QWEN_BPE_SIZE + i
    return tokenizers.Tokenizer.from_str(json.dumps(raw))


def _write(out: Path, text_layers: int, vision_depth: int) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    real = shapes_config(text_layers, vision_depth)
    raw = padded_qwen_tokenizer()
    ids = {t: raw.token_to_id(t) for t, _ in tiny.QWEN_ADDED_TOKENS}
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                       ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>")):
        if ids[token] != real[key]:
            raise AssertionError(f"{token} has id {ids[token]}, Qwen2.5-VL-7B's {key} is {real[key]}")
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=raw,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,  # Qwen2.5-VL-7B-Instruct's tokenizer_config.json
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    pixels = {"min_pixels": QWEN2_5_VL_7B_MIN_PIXELS, "max_pixels": QWEN2_5_VL_7B_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=tiny.QWEN2_5_VL_CHAT_TEMPLATE,
    )
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "max_window_layers", "rms_norm_eps",
                 "hidden_act", "use_sliding_window", "sliding_window", "attention_dropout",
                 "initializer_range", "vocab_size", "bos_token_id", "eos_token_id")
    vision = {k: v for k, v in real["vision_config"].items() if k not in ("in_chans", "spatial_patch_size")}
    vision["in_channels"] = real["vision_config"]["in_chans"]
    config = Qwen2_5_VLConfig(
        text_config={
            **{k: real[k] for k in text_keys},
            "pad_token_id": ids["<|endoftext|>"],
            "rope_scaling": {**real["rope_scaling"], "rope_theta": real["rope_theta"]},
        },
        vision_config=vision,
        **{k: real[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                "vision_end_token_id", "tie_word_embeddings", "architectures")},
        dtype="bfloat16",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Plain greedy defaults, as for the tiny model (the real top_k / repetition_penalty
    # defaults would make HF's `generate` and vLLM disagree unless every caller overrode them).
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)


def build_qwen2_5_vl_7b_shapes(
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    text_layers: int = SHAPES_TEXT_LAYERS,
    vision_depth: int = SHAPES_VISION_DEPTH,
) -> Path:
    """Qwen2.5-VL-7B-Instruct's configuration with `text_layers` language layers and
    `vision_depth` vision blocks (the last one full-attention), random bf16 weights, a
    tokenizer with Qwen's special tokens at their real ids; cached like the tiny models."""
    shapes_config(text_layers, vision_depth)  # validates the depths
    source = inspect.getsource(sys.modules[__name__])
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    kind = f"qwen2.5-vl-7b-shapes-L{text_layers}-V{vision_depth}-{digest}"
    return tiny._cached_build(kind, seed, cache_dir, lambda out: _write(out, text_layers, vision_depth))
