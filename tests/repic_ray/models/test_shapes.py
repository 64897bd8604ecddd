"""The shape-faithful Qwen2.5-VL-7B: Qwen2.5-VL-7B-Instruct's configuration, depth reduced.

Cheap checks here (configuration, tokenizer, parameter count on the meta device); the
build, HF and vLLM loads are in `test_shapes_load.py` (slow, heavy).
"""

from __future__ import annotations

import pytest
import torch

from repic_ray.models.known import KNOWN_CONFIGS, shapes_config
from repic_ray.models.shapes import padded_qwen_tokenizer
from repic_ray.models.tiny import QWEN_ADDED_TOKENS

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, typed in from the published file.
REAL_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "max_position_embeddings": 128000, "hidden_act": "silu",
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 32768,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656,
}
REAL_ROPE = {"type": "mrope", "mrope_section": [16, 24, 24]}
REAL_VISION = {
    "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "window_size": 112, "tokens_per_second": 2, "temporal_patch_size": 2, "hidden_act": "silu",
}
# Qwen2.5's added tokens at their ids in Qwen2.5-VL-7B-Instruct's tokenizer.json.
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|file_sep|>": 151664}


def test_known_7b_config_is_the_published_one():
    real = KNOWN_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert {k: real[k] for k in REAL_TEXT} == REAL_TEXT
    assert real["rope_scaling"] == REAL_ROPE
    assert {k: real["vision_config"][k] for k in REAL_VISION} == REAL_VISION
    assert (real["num_hidden_layers"], real["vision_config"]["depth"]) == (28, 32)
    assert real["vision_config"]["fullatt_block_indexes"] == [7, 15, 23, 31]


def test_shapes_config_reduces_only_the_depth():
    cfg = shapes_config()
    assert {k: cfg[k] for k in REAL_TEXT} == REAL_TEXT
    assert cfg["rope_scaling"] == REAL_ROPE
    assert {k: cfg["vision_config"][k] for k in REAL_VISION} == REAL_VISION
    assert (cfg["num_hidden_layers"], cfg["vision_config"]["depth"]) == (2, 4)
    # one full-attention block, the rest window attention
    assert cfg["vision_config"]["fullatt_block_indexes"] == [3]
    assert shapes_config(3, 8)["vision_config"]["fullatt_block_indexes"] == [7]
    with pytest.raises(ValueError, match="vision_depth"):
        shapes_config(2, 1)
    # the table is not modified by building a variant
    assert KNOWN_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"]["num_hidden_layers"] == 28


def test_padded_tokenizer_has_qwens_special_ids_and_encodes_text():
    tok = padded_qwen_tokenizer()
    assert {t: tok.token_to_id(t) for t in REAL_IDS} == REAL_IDS
    assert tok.get_vocab_size() == 151643 + len(QWEN_ADDED_TOKENS) == 151665
    text = "<|im_start|>user\nThis is <Bo>, a red dog.<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 151644 and enc.ids[-1] == 151645
    assert max(enc.ids[1:-1]) < 4096  # ordinary text uses the real BPE entries, not the padding
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def test_shapes_model_has_7b_layer_shapes():
    """Built on the meta device (no memory): every tensor of a language layer and of a
    vision block has the 7B's shape, and the whole has ~1.6 B parameters."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = shapes_config()
    text = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "vocab_size")}
    vision = dict(cfg["vision_config"], in_channels=3)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layer = "model.language_model.layers.1."
    assert shapes[layer + "self_attn.q_proj.weight"] == (3584, 3584)
    assert shapes[layer + "self_attn.k_proj.weight"] == (512, 3584)  # 4 KV heads x 128
    assert shapes[layer + "mlp.down_proj.weight"] == (3584, 18944)
    assert shapes["lm_head.weight"] == (152064, 3584)
    assert shapes["model.visual.blocks.3.attn.qkv.weight"] == (3840, 1280)
    assert shapes["model.visual.blocks.3.mlp.gate_proj.weight"] == (3420, 1280)
    assert shapes["model.visual.merger.mlp.2.weight"] == (3584, 5120)
    total = sum(p.numel() for p in model.parameters())
    assert 1.5e9 < total < 1.8e9
