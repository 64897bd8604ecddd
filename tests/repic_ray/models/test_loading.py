"""Tests of `repic_ray.models.loading`: one loading path for tiny and real checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from repic_ray.models import loading, tiny
from repic_ray.models.loading import (
    load_clip,
    load_detector,
    load_policy,
    load_processor,
    qwen_mm_inputs,
    resolve_checkpoint,
    vision_special_token_ids,
)


def _shape(colour, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([3, 3, size - 4, size - 4], fill=colour)
    return image


def test_tiny_specs_resolve_to_cached_builds(tiny_qwen_dir):
    assert resolve_checkpoint("tiny:qwen2.5-vl") == str(tiny_qwen_dir)
    assert resolve_checkpoint("tiny:qwen2.5-vl@seed=0") == str(tiny_qwen_dir)


def test_tiny_seed_suffix_reaches_the_builder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(loading.TINY_BUILDERS, "clip", lambda seed: calls.append(seed) or tmp_path)
    assert resolve_checkpoint("tiny:clip@seed=3") == str(tmp_path)
    assert resolve_checkpoint("tiny:clip") == str(tmp_path)
    assert calls == [3, 0]


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:clip@seed=x", "tiny:", "tiny:clip@3"])
def test_unknown_tiny_spec(spec):
    with pytest.raises(ValueError, match="tiny:<model>"):
        resolve_checkpoint(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "IDEA-Research/grounding-dino-tiny",
        "openai/clip-vit-large-patch14-336",
    ],
)
def test_hub_ids_pass_through(spec):
    assert resolve_checkpoint(spec) == spec


def test_existing_local_path_passes_through(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("spec", ["/nonexistent/ckpt", "./runs/ckpt", "ckpt", "~/models/x"])
def test_missing_local_path(spec):
    with pytest.raises(FileNotFoundError, match="not an existing path"):
        resolve_checkpoint(spec)


def test_local_directory_loads_through_the_same_functions(tiny_qwen_dir):
    # The tiny checkpoint addressed as a plain path, as a real one would be.
    by_path = load_policy(str(tiny_qwen_dir))
    by_spec = load_policy("tiny:qwen2.5-vl")
    assert type(by_path).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not by_path.training
    a, b = by_path.state_dict(), by_spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    processor = load_processor(str(tiny_qwen_dir))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.image_processor.size["shortest_edge"] == tiny.QWEN_MIN_PIXELS


@pytest.mark.filterwarnings("error::FutureWarning")
def test_load_processor_pixel_bounds(tiny_qwen_dir):
    processor = load_processor(str(tiny_qwen_dir), min_pixels=56 * 56, max_pixels=112 * 112)
    for sub in (processor.image_processor, processor.video_processor):
        assert (sub.size["shortest_edge"], sub.size["longest_edge"]) == (56 * 56, 112 * 112)
    # A 28-px reference is now upscaled to 56 px: 4 vision tokens instead of 1.
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    enc = qwen_mm_inputs(processor, slot, [_shape("red", 28)])
    assert enc["mm_token_type_ids"].sum().item() == 4
    # One bound alone keeps the checkpoint's other bound.
    processor = load_processor(str(tiny_qwen_dir), max_pixels=56 * 56)
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (tiny.QWEN_MIN_PIXELS, 56 * 56)


def test_load_policy_dtype_and_attention(tiny_qwen_dir):
    model = load_policy(str(tiny_qwen_dir), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_hub_id_offline_and_not_cached_fails_clearly(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import.
    code = (
        "from repic_ray.models.loading import load_detector\n"
        "try:\n"
        "    load_detector('IDEA-Research/grounding-dino-tiny')\n"
        "except OSError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    message = res.stdout.split("ERROR:", 1)[1]
    assert "'IDEA-Research/grounding-dino-tiny'" in message
    assert "HF_HUB_OFFLINE" in message and "hf download" in message


def test_vision_special_token_ids(tiny_qwen_dir):
    processor = load_processor(str(tiny_qwen_dir))
    tok = processor.tokenizer
    expected = sorted(tok.convert_tokens_to_ids(t) for t in loading.VISION_SPECIAL_TOKENS)
    assert vision_special_token_ids(tok) == expected
    assert vision_special_token_ids(processor) == expected
    assert processor.image_token_id in expected and len(expected) == 5


def test_qwen_mm_inputs_marks_image_tokens(tiny_qwen_dir):
    processor = load_processor(str(tiny_qwen_dir))
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    processor.tokenizer.padding_side = "left"
    enc = qwen_mm_inputs(
        processor,
        [f"{slot}This is <Bo>.{slot}Describe it.", "A caption without images."],
        [_shape("red", 28), _shape("blue", 84)],
    )
    ids, types = enc["input_ids"], enc["mm_token_type_ids"]
    assert ids.shape == types.shape == enc["attention_mask"].shape
    assert torch.equal(types, (ids == processor.image_token_id).long())
    assert types.sum(dim=1).tolist() == [1 + 9, 0]
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2], [1, 6, 6]]
    assert enc["attention_mask"][1, 0].item() == 0  # left padding


def test_mm_token_type_ids_select_3d_positions(tiny_qwen_dir):
    """Without `mm_token_type_ids` transformers silently uses 1D positions; the logits of
    the text after an image then differ (the learner/rollout log-prob mismatch)."""
    processor = load_processor(str(tiny_qwen_dir))
    model = load_policy(str(tiny_qwen_dir))
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    enc = qwen_mm_inputs(processor, f"{slot}A photo of Bo.", [_shape("green", 84)])
    without = {k: v for k, v in enc.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        logits_3d = model(**enc).logits
        logits_1d = model(**without).logits
    n_before = int(torch.nonzero(enc["mm_token_type_ids"][0])[0])
    # Positions agree before the image and differ from the image on.
    torch.testing.assert_close(logits_3d[:, :n_before], logits_1d[:, :n_before])
    assert (logits_3d[:, -1] - logits_1d[:, -1]).abs().max() > 1e-3


def test_tiny_grounding_dino_detects(tmp_path):
    processor, model = load_detector("tiny:grounding-dino")
    assert type(model).__name__ == "GroundingDinoForObjectDetection" and not model.training
    assert model.config.decoder_layers >= 2
    assert model.config.backbone_config.model_type == "swin"  # built here, not from timm
    image = _shape("red", 96)
    inputs = processor(images=image, text="a dog. a mug.", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    (result,) = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=0.0, text_threshold=0.0, target_sizes=[(96, 96)]
    )
    n = model.config.num_queries
    assert result["boxes"].shape == (n, 4) and result["scores"].shape == (n,)
    assert len(result["text_labels"]) == n
    assert torch.isfinite(result["boxes"]).all()


def test_tiny_grounding_dino_tokenizer_knows_the_world():
    processor, _ = load_detector("tiny:grounding-dino")
    tok = processor.tokenizer
    from repic_ray.data.vocab import CATEGORIES

    for word in CATEGORIES:
        assert tok.tokenize(f"a {word}.") == ["a", word, "."]
    # Unknown words still encode, as WordPiece continuations, never [UNK].
    assert tok.unk_token not in tok.tokenize("a zebra2 Quokka")


def test_tiny_clip_embeds_images_and_text():
    processor, model = load_clip("tiny:clip")
    assert type(model).__name__ == "CLIPModel" and not model.training
    images = [_shape("red", 40), _shape("blue", 64)]
    with torch.no_grad():
        image_embeds = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text = processor(text=["a red dog", "Captain Fluff"], padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(**text)
    assert image_embeds.pooler_output.shape == (2, model.config.projection_dim)
    assert text_embeds.pooler_output.shape == (2, model.config.projection_dim)
    assert not torch.allclose(image_embeds.pooler_output[0], image_embeds.pooler_output[1])
    # Names are whole words (CLIP lower-cases); unknown text still encodes byte by byte.
    assert processor.tokenizer.tokenize("Captain Fluff") == ["captain</w>", "fluff</w>"]
    assert processor.tokenizer.decode(text.input_ids[1], skip_special_tokens=True) == (
        "captain fluff"
    )


@pytest.mark.parametrize("builder", [tiny.build_tiny_grounding_dino, tiny.build_tiny_clip])
def test_detector_and_clip_builds_are_deterministic(builder, tmp_path):
    a = builder(seed=0, cache_dir=tmp_path / "a")
    b = builder(seed=0, cache_dir=tmp_path / "b")
    c = builder(seed=1, cache_dir=tmp_path / "a")
    assert a.name == b.name != c.name
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
