"""Tests for repic_ray/prompts.py: RePIC suffixes, image/name order, rendering with the tiny
Qwen2.5-VL processor."""

import random
from collections import Counter

import pytest
import transformers
from PIL import Image

from repic_ray.data.formats import TrainSample
from repic_ray.models.tiny import build_tiny_qwen2_5_vl
from repic_ray.prompts import (
    IOU_SUFFIX,
    NAME_SUFFIX,
    NO_DUPLICATE_SUFFIX,
    YES_NO_SUFFIX,
    bare_text,
    build_messages,
    build_prompt,
    caption_prompt,
    task_suffix,
)


@pytest.fixture(scope="module")
def processor():
    return transformers.AutoProcessor.from_pretrained(build_tiny_qwen2_5_vl())


@pytest.fixture()
def images(tmp_path):
    """Two 28-px references and an 84-px query on disk."""
    paths = []
    for name, size in (("bo", 28), ("miss_daisy", 28), ("query", 84)):
        p = tmp_path / f"{name}.png"
        Image.new("RGB", (size, size), (100, 20, 200)).save(p)
        paths.append(str(p))
    return paths


def _sample(images, method="yes_no_name_multi", **kw):
    solution = {"yes_no": "yes", "yes_no_name": "Bo", "yes_no_name_multi": ["Bo", "Miss Daisy"],
                "iou": [1, 2, 30, 40]}[method]
    return TrainSample(images=images, problem="Give a caption of the image.", solution=solution,
                       accu_reward_method=method, **kw)


def test_identity_suffix_follows_repics_randint_draw():
    # RePIC: roll = random.randint(0, 4); 0 -> name, 1 -> no-duplicate, 2..4 -> nothing.
    # The same seeded stream must give exactly that mapping, draw by draw.
    ours, twin = random.Random(7), random.Random(7)
    expected = {0: NAME_SUFFIX, 1: NO_DUPLICATE_SUFFIX, 2: "", 3: "", 4: ""}
    got = []
    for i in range(5000):
        method = "yes_no_name" if i % 2 else "yes_no_name_multi"
        s = task_suffix(method, ours)
        assert s == expected[twin.randint(0, 4)]
        got.append(s)
    # ... and so the 1/5, 1/5, 3/5 split (5000 draws: std of a 1/5 share is ~0.006).
    freq = Counter(got)
    assert abs(freq[NAME_SUFFIX] / 5000 - 0.2) < 0.03
    assert abs(freq[NO_DUPLICATE_SUFFIX] / 5000 - 0.2) < 0.03
    assert abs(freq[""] / 5000 - 0.6) < 0.03


def test_fixed_suffixes_do_not_consume_randomness():
    rng = random.Random(3)
    state = rng.getstate()
    assert task_suffix("iou", rng) == IOU_SUFFIX
    assert task_suffix("yes_no", rng) == YES_NO_SUFFIX
    assert task_suffix("yes_no_name", rng, "none") == ""
    assert task_suffix("yes_no_name_multi", rng, "name") == NAME_SUFFIX
    assert task_suffix("iou", rng, "bare") == "" and task_suffix("yes_no", rng, "bare") == ""
    assert rng.getstate() == state
    with pytest.raises(ValueError, match="suffix_mode"):
        task_suffix("iou", rng, "sometimes")


def test_each_reference_image_is_followed_by_its_name_then_query_then_question(images):
    msgs = build_messages(images, ["Bo", "Miss Daisy"], "Where is <Bo>?" + IOU_SUFFIX)
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"] == [
        {"type": "image", "image": images[0]},
        {"type": "text", "text": "This is <Bo>.\n"},
        {"type": "image", "image": images[1]},
        {"type": "text", "text": "This is <Miss Daisy>.\n"},
        {"type": "image", "image": images[2]},
        {"type": "text", "text": "Where is <Bo>?" + IOU_SUFFIX},
    ]
    # Without names (RePIC's own layout): all images, then the text.
    plain = build_messages(images, None, "q")[0]["content"]
    assert [p["type"] for p in plain] == ["image", "image", "image", "text"]
    with pytest.raises(ValueError, match="1 reference names for 2 reference images"):
        build_messages(images, ["Bo"], "q")


def test_rendered_prompt_with_tiny_processor(processor, images):
    s = _sample(images, ref_names=["Bo", "Miss Daisy"])
    p = build_prompt(s, processor, rng=random.Random(0), suffix_mode="name")
    assert p.image_paths == images
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert p.text.count(vis) == 3
    assert (
        f"<|im_start|>user\n{vis}This is <Bo>.\n{vis}This is <Miss Daisy>.\n{vis}"
        f"Give a caption of the image.{NAME_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    ) in p.text
    assert p.text.endswith("<|im_start|>assistant\n")
    # The same text feeds the processor: two 1-token references + a 9-token query.
    enc = processor(text=[p.text], images=p.load_images(), return_tensors="pt")
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == pad_id).sum()) == 1 + 1 + 9
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 6, 6]]
    # The tokenizer alone renders the same text.
    assert build_prompt(s, processor.tokenizer, rng=random.Random(0), suffix_mode="name").text == p.text


def test_build_prompt_suffix_per_task(processor, images):
    rng = random.Random(0)
    iou = build_prompt(_sample(images[1:], "iou", ref_names=["Bo"]), processor, rng=rng)
    assert f"Give a caption of the image.{IOU_SUFFIX}<|im_end|>" in iou.text
    yn = build_prompt(_sample(images[1:], "yes_no", ref_names=["Bo"]), processor, rng=rng)
    assert f"{YES_NO_SUFFIX}<|im_end|>" in yn.text
    bare = build_prompt(_sample(images[1:], "yes_no"), processor, rng=rng, suffix_mode="bare")
    assert "image.<|im_end|>" in bare.text and "This is" not in bare.text


def test_vllm_input_and_caption_prompt(processor, images):
    p = caption_prompt(images[2], [(images[0], "Bo"), (images[1], "<Miss Daisy>")], processor)
    assert p.image_paths == images
    assert "This is <Bo>.\n" in p.text and "This is <Miss Daisy>.\n" in p.text
    inp = p.vllm_input()
    assert inp["prompt"] == p.text
    assert [im.size for im in inp["multi_modal_data"]["image"]] == [(28, 28), (28, 28), (84, 84)]
    with pytest.raises(ValueError, match="3 images, got 1"):
        p.vllm_input([Image.new("RGB", (28, 28))])


def test_render_needs_a_chat_template(images):
    with pytest.raises(TypeError, match="apply_chat_template"):
        build_prompt(_sample(images), object(), rng=random.Random(0))


def test_bare_layout_puts_each_name_right_after_its_image_and_tokenizes_names_as_the_prompt(processor, images):
    vis = "<|vision_start|><|image_pad|>"
    text = bare_text(images, ["Bo", "Miss Daisy"])
    assert text == f"{vis}Bo{vis}Miss Daisy{vis}"
    enc = processor(text=[text], images=[Image.open(p) for p in images], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 6, 6]]
    # The name's tokens are the ones of "<Bo>" in the chat prompt and of an SFT target "Bo".
    tok = processor.tokenizer
    ids = enc["input_ids"][0].tolist()
    name = tok.encode("Bo", add_special_tokens=False)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    start = ids.index(pad) + 1  # the first reference is one vision token
    assert ids[start:start + len(name)] == name
    assert bare_text(images[-1:], None) == vis
    with pytest.raises(ValueError, match="2 reference images"):
        bare_text(images, ["Bo"])
    with pytest.raises(ValueError, match="query image"):
        bare_text([], None)
