"""Tests of `repic_ray.models.tiny`: deterministic, cached, loadable tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from repic_ray.data.vocab import CATEGORIES, NAMES, all_words
from repic_ray.models import tiny
from repic_ray.models.tiny import QWEN_ADDED_TOKENS, build_tiny_qwen2_5_vl


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2_5_vl(seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def processor(qwen_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(qwen_dir)


def test_default_cache_dir_follows_repic_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("REPIC_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("REPIC_CACHE")
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "repic" / "models"


def test_second_build_reuses_the_directory(qwen_dir, monkeypatch):
    def fail(out):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(tiny, "_write_qwen2_5_vl", fail)
    assert build_tiny_qwen2_5_vl(seed=0, cache_dir=qwen_dir.parent) == qwen_dir
    # Only the finished directory is left: the temporary build directory was renamed.
    assert [p.name for p in qwen_dir.parent.iterdir()] == [qwen_dir.name]


def test_losing_a_build_race_returns_the_winners_directory(tmp_path):
    # Another process renames its finished copy into place while this one is building.
    def write(out: Path) -> None:
        (out / "mine").write_text("loser")
        final = out.parent / out.name[1:].rsplit(".", 1)[0]  # tmp is ".<final>.<random>"
        final.mkdir()
        (final / "theirs").write_text("winner")

    final = tiny._cached_build("fake", 0, tmp_path, write)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert [p.name for p in final.iterdir()] == ["theirs"]


def test_build_is_byte_identical_in_a_fresh_process(qwen_dir, tmp_path):
    # Another interpreter with another hash seed: nothing may depend on set/dict order
    # or on global RNG state.
    code = (
        "import sys; from repic_ray.models.tiny import build_tiny_qwen2_5_vl as b; "
        "print(b(seed=0, cache_dir=sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    other = Path(res.stdout.strip().splitlines()[-1])
    assert other.name == qwen_dir.name
    assert _files(other) == _files(qwen_dir)


def test_another_seed_gives_other_weights(qwen_dir, tmp_path):
    other = build_tiny_qwen2_5_vl(seed=1, cache_dir=tmp_path)
    assert other.name != qwen_dir.name
    a = load_file(qwen_dir / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    name = "model.layers.0.self_attn.q_proj.weight"  # the hub checkpoints' key layout
    assert not torch.equal(a[name], b[name])
    assert (qwen_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_qwen2_5_vl(seed=3, cache_dir=tmp_path)
    torch.testing.assert_close(torch.rand(3), expected)


def test_config_matches_the_design_sizes(qwen_dir, processor):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (128, 4)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (4, 4)
    assert text["intermediate_size"] == 512
    assert (vision["depth"], vision["hidden_size"], vision["patch_size"]) == (2, 64, 14)
    assert vision["spatial_merge_size"] == 2 and vision["out_hidden_size"] == 128
    assert text["vocab_size"] == len(processor.tokenizer)
    assert 1000 <= text["vocab_size"] <= 4096


def test_special_token_ids_match_config(qwen_dir, processor):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    gen = json.loads((qwen_dir / "generation_config.json").read_text())
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    # Qwen2.5's added tokens follow the BPE vocabulary, in Qwen2.5's order.
    first = ids["<|endoftext|>"]
    assert list(ids.values()) == list(range(first, first + len(QWEN_ADDED_TOKENS)))
    assert first + len(QWEN_ADDED_TOKENS) == len(tok)
    assert cfg["image_token_id"] == ids["<|image_pad|>"] == processor.image_token_id
    assert cfg["video_token_id"] == ids["<|video_pad|>"] == processor.video_token_id
    assert cfg["vision_start_token_id"] == ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == ids["<|vision_end|>"]
    assert cfg["text_config"]["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert tok.pad_token_id == ids["<|endoftext|>"]
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    # Special tokens are matched whole in text, never split into BPE pieces.
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    assert tok(text).input_ids == [
        ids["<|im_start|>"],
        *tok("user\n").input_ids,
        ids["<|vision_start|>"],
        ids["<|image_pad|>"],
        ids["<|vision_end|>"],
        *tok("hi").input_ids,
        ids["<|im_end|>"],
    ]
    assert tok("user").input_ids == [tok.convert_tokens_to_ids("user")]


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>A photo of <Bo> and Captain Fluff at the top left.<|im_end|>",
        "Zebra-crossing québec 東京 🐕‍🦺 \t\n\r  tabs  and  spaces ",
        '{"bbox_2d": [12, 34, 560, 78]} ~!@#$%^&*()_+`',
        "\x00\x07 control \u200b zero-width \U0010ffff",
    ],
)
def test_tokenizer_round_trips_any_text(processor, text):
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_tokenizer_round_trips_random_unicode(processor):
    tok = processor.tokenizer
    gen = torch.Generator().manual_seed(0)
    # Code points from ASCII through the astral planes, skipping surrogates. Qwen's NFC
    # normaliser maps e.g. CJK compatibility ideographs to their canonical forms, so the
    # exact round trip holds for NFC text (as for the real Qwen2.5 tokenizer).
    points = torch.randint(1, 0x2FFFF, (2000,), generator=gen).tolist()
    text = unicodedata.normalize("NFC", "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000))
    ids = tok(text, add_special_tokens=False, verbose=False).input_ids
    assert tok.unk_token_id is None and tok.decode(ids) == text


def test_world_words_are_single_tokens(processor):
    tok = processor.tokenizer
    words = all_words() + list(CATEGORIES) + [w for n in NAMES for w in n.split()]
    for word in words:
        for form in (word, word.capitalize()):
            assert len(tok(" " + form, add_special_tokens=False).input_ids) == 1, form
            assert len(tok(form, add_special_tokens=False).input_ids) == 1, form
    for name in NAMES:
        n_words = len(name.split())
        assert len(tok(" " + name, add_special_tokens=False).input_ids) == n_words, name
        # Qwen's pre-tokenizer splits " <", the name and ">": nothing can merge across.
        n = len(tok(f" <{name}>", add_special_tokens=False).input_ids)
        assert n == n_words + 2, name


def test_chat_template_renders_multi_image_user_turns(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "This is <Bo>."},
                {"type": "image"},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>This is <Bo>."
        "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("size,tokens", [(28, 1), (56, 4), (84, 9)])
def test_image_token_counts(processor, size, tokens):
    image = Image.new("RGB", (size, size), (200, 30, 30))
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    enc = processor(text=[text], images=[image], return_tensors="pt")
    assert (enc["input_ids"] == processor.image_token_id).sum().item() == tokens
    assert enc["image_grid_thw"].tolist() == [[1, size // 14, size // 14]]


def test_qwen_loads_with_auto_classes(qwen_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 3e6
    out = model(input_ids=torch.tensor([tok("a red circle").input_ids]))
    assert out.logits.shape == (1, 3, len(tok))
    assert torch.isfinite(out.logits).all()
