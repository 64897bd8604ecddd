"""Architectures of real checkpoints, as their `config.json` states them (no imports
beyond the standard library: `repic plan` reads these without loading a model)."""

from __future__ import annotations

import copy

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (the fields that define the architecture).
QWEN2_5_VL_7B_CONFIG: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

SHAPES_SPEC = "tiny:qwen2.5-vl-7b-shapes"
"""Checkpoint spec of the shape-faithful 7B (`repic_ray.models.shapes`)."""
SHAPES_TEXT_LAYERS = 2
SHAPES_VISION_DEPTH = 4

KNOWN_CONFIGS: dict[str, dict] = {"Qwen/Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B_CONFIG}
"""config.json of hub models by id, for planning without a download."""


def shapes_config(text_layers: int = SHAPES_TEXT_LAYERS, vision_depth: int = SHAPES_VISION_DEPTH) -> dict:
    """Qwen2.5-VL-7B-Instruct's config.json with only the depth reduced: `text_layers`
    language layers and `vision_depth` vision blocks, the last one full-attention (as
    blocks 7/15/23/31 are in the 32-block tower), the others window attention."""
    if text_layers < 1 or vision_depth < 2:
        raise ValueError(f"need text_layers >= 1 and vision_depth >= 2, got {text_layers}, {vision_depth}")
    cfg = copy.deepcopy(QWEN2_5_VL_7B_CONFIG)
    cfg.update(num_hidden_layers=text_layers, max_window_layers=text_layers)
    cfg["vision_config"].update(depth=vision_depth, fullatt_block_indexes=[vision_depth - 1])
    return cfg
