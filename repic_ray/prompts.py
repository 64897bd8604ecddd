"""RePIC prompts: one `Prompt` drives HF generation, vLLM rollouts and the learner.

A prompt is a single user turn (HF chat format). Images come first, each reference
image immediately followed by its name, then the query image, then the question:

    [ref image] "This is <Bo>."  [ref image] "This is <Mia>."  [query image]  question + suffix

Putting the name right next to its image is what lets a model bind the two (RePIC's
own training prompts list the images and put all text after them; a sample without
`ref_names` is laid out that way). The question gets RePIC's answer-format suffix
(oyt9306/RePIC
`training/src/open-r1-multimodal/src/open_r1/grpo_multitask_multi_img_no_format.py`):

- identity captions (`yes_no_name`, `yes_no_name_multi`), at random (`randint(0, 4)`):
  0 -> " Output the final answer including its name.", 1 -> " Output the final answer
  without duplicating the given information.", 2-4 -> nothing;
- `iou`: " For bounding box coordinates, return the final answer in JSON format.";
- `yes_no`: " The final answer must be either 'yes' or 'no' with no additional output."

`Prompt.text` is the chat template rendered with `add_generation_prompt=True`; feed
it as `{"prompt": prompt.text, "multi_modal_data": {"image": images}}` to vLLM and as
`processor(text=[prompt.text], images=images)` to the learner, with the images of
`prompt.image_paths` in that order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from repic_ray.data.formats import TrainSample
from repic_ray.data.images import load_image

NAME_SUFFIX = " Output the final answer including its name."
NO_DUPLICATE_SUFFIX = " Output the final answer without duplicating the given information."
IOU_SUFFIX = " For bounding box coordinates, return the final answer in JSON format."
YES_NO_SUFFIX = " The final answer must be either 'yes' or 'no' with no additional output."

IDENTITY_METHODS = ("yes_no_name", "yes_no_name_multi")

SUFFIX_MODES = ("random", "none", "name", "bare")
"""How identity captions get a suffix:
"random" RePIC's training draw (1/5 name, 1/5 no-duplicate, 3/5 nothing); "none" nothing
(RePIC's evaluation of its own model); "name" always `NAME_SUFFIX` (RePIC's zero-shot
evaluation). "bare" adds no suffix to any task, iou and yes_no included."""

DEFAULT_CAPTION_QUESTION = "Give a personalized caption of this image."


@dataclass
class Prompt:
    """A rendered prompt and the images it refers to."""

    messages: list[dict[str, Any]]
    """HF chat messages: one user turn of `{"type": "image", "image": path}` and
    `{"type": "text", "text": ...}` parts."""
    image_paths: list[str]
    """Image files in order of appearance (references first, query last)."""
    text: str
    """The chat template rendered with `add_generation_prompt=True`, not tokenized."""

    def load_images(self) -> list[Image.Image]:
        """The images as RGB, in prompt order (`ImageError` on an unreadable file)."""
        return [load_image(p) for p in self.image_paths]

    def vllm_input(self, images: Sequence[Image.Image] | None = None) -> dict[str, Any]:
        """The vLLM prompt dict; loads the images unless given."""
        imgs = list(images) if images is not None else self.load_images()
        if len(imgs) != len(self.image_paths):
            raise ValueError(f"prompt has {len(self.image_paths)} images, got {len(imgs)}")
        return {"prompt": self.text, "multi_modal_data": {"image": imgs}}


def _bracketed(name: str) -> str:
    return name if name.startswith("<") and name.endswith(">") else f"<{name}>"


def reference_text(name: str) -> str:
    """The text placed right after a reference image."""
    return f"This is {_bracketed(name)}.\n"


def task_suffix(method: str, rng: random.Random, mode: str = "random") -> str:
    """RePIC's answer-format suffix for a task; draws from `rng` only for identity captions
    in "random" mode."""
    if mode not in SUFFIX_MODES:
        raise ValueError(f"suffix_mode: must be one of {list(SUFFIX_MODES)}, got {mode!r}")
    if mode == "bare":
        return ""
    if method == "iou":
        return IOU_SUFFIX
    if method == "yes_no":
        return YES_NO_SUFFIX
    if method not in IDENTITY_METHODS:
        raise ValueError(f"unknown accu_reward_method {method!r}")
    if mode == "none":
        return ""
    if mode == "name":
        return NAME_SUFFIX
    roll = rng.randint(0, 4)
    return NAME_SUFFIX if roll == 0 else NO_DUPLICATE_SUFFIX if roll == 1 else ""


def build_messages(image_paths: Sequence[str], ref_names: Sequence[str] | None,
                   question: str) -> list[dict[str, Any]]:
    """One user turn: each reference image followed by its name, the query image, the question.

    `image_paths` ends with the query; `ref_names` names the others (None: no names).
    """
    if not image_paths:
        raise ValueError("a prompt needs at least the query image")
    refs, query = list(image_paths[:-1]), image_paths[-1]
    if ref_names is not None and len(ref_names) != len(refs):
        raise ValueError(f"{len(ref_names)} reference names for {len(refs)} reference images")
    content: list[dict[str, Any]] = []
    for i, path in enumerate(refs):
        content.append({"type": "image", "image": str(path)})
        if ref_names is not None:
            content.append({"type": "text", "text": reference_text(ref_names[i])})
    content.append({"type": "image", "image": str(query)})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def render(messages: list[dict[str, Any]], processor_or_tokenizer: Any) -> str:
    """Render messages with the processor's (or tokenizer's) chat template, ready to generate."""
    apply = getattr(processor_or_tokenizer, "apply_chat_template", None)
    if apply is None:
        raise TypeError(
            f"{type(processor_or_tokenizer).__name__} has no apply_chat_template; pass the "
            "model's processor or tokenizer"
        )
    text = apply(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):  # some versions return a one-element batch
        (text,) = text
    return text


def build_prompt(sample: TrainSample, processor_or_tokenizer: Any, *, rng: random.Random,
                 suffix_mode: str = "random") -> Prompt:
    """The prompt of a training or evaluation sample (see the module docstring)."""
    question = sample.problem + task_suffix(sample.accu_reward_method, rng, suffix_mode)
    messages = build_messages(sample.images, sample.ref_names, question)
    return Prompt(messages, list(sample.images), render(messages, processor_or_tokenizer))


BARE_IMAGE = "<|vision_start|><|image_pad|>"
"""One image in the bare layout: the processor expands the pad token; the model's rotary
positions need the start token; the end token is left out, so a name's first token
directly follows its image's last."""


def bare_text(image_paths: Sequence[str], ref_names: Sequence[str] | None) -> str:
    """The bare layout of SFT's curriculum (`sft.bare_layout_steps`): each reference
    image directly followed by its name, then the query image; no chat template, no
    question, no `<|vision_end|>`. The names are spelled as inside the real prompt's
    `<Name>`, so the target tokens are the same in both layouts."""
    if not image_paths:
        raise ValueError("a prompt needs at least the query image")
    names = list(ref_names or [])
    if names and len(names) != len(image_paths) - 1:
        raise ValueError(f"{len(names)} reference names for {len(image_paths) - 1} reference images")
    refs = [BARE_IMAGE + (names[i] if names else "") for i in range(len(image_paths) - 1)]
    return "".join(refs) + BARE_IMAGE


def caption_prompt(query_image: str, references: Sequence[tuple[str, str]],
                   processor_or_tokenizer: Any, *, question: str = DEFAULT_CAPTION_QUESTION,
                   suffix: str = "") -> Prompt:
    """A captioning request (serving, evaluation): `references` are (image path, name) pairs
    shown before the query; `suffix` is appended to the question as is."""
    paths = [p for p, _ in references] + [query_image]
    messages = build_messages(paths, [n for _, n in references], question + suffix)
    return Prompt(messages, paths, render(messages, processor_or_tokenizer))
