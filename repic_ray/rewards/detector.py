"""Detector-verified recognition reward (open-set detector: Grounding DINO).

For every concept the caption names (found with the shared matcher among the
sample's `candidate_names` and `concept_names`), the detector is asked whether
an entity of that concept's category is in the query image, with a text prompt
built from the category (`prompt_template`, e.g. "a dog."). A named concept is
*verified* when some detector query has

    max over all text tokens of sigmoid(logit)              >= box_threshold, and
    max over the category's own tokens of sigmoid(logit)    >= text_threshold

(Grounding DINO's two thresholds; a threshold of 0 accepts everything, one
above 1 accepts nothing). Then, per sample:

    recall        = |verified ∩ concept_names| / |concept_names|
    hallucinated  = |named − verified| / max(1, |named|)
    reward        = recall_weight · recall − hallucination_weight · hallucinated

The detector is loaded once per reward object and run batched over the distinct
(image, category) pairs of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repic_ray.matching import MODES, find_names, lookup_name, name_key
from repic_ray.rewards.base import CAPTION_TASKS, RewardInput, RewardOutput, caption_mask_B


@dataclass
class DetectorRewardConfig:
    """Detector-verified recognition reward."""

    checkpoint: str = "checkpoints/tiny-gdino"
    """Detector spec for `repic_ray.models.loading.load_detector`: the shipped tiny
    detector trained on the synthetic world (default), a real one such as
    "IDEA-Research/grounding-dino-tiny", or "tiny:grounding-dino" (random weights)."""
    box_threshold: float = 0.35
    """A detector query counts when its best token score reaches this (Grounding DINO default 0.35)."""
    text_threshold: float = 0.25
    """... and its best score on the category's own tokens reaches this (default 0.25)."""
    prompt_template: str = "a {category}."
    """Detector text prompt; `{category}` is the concept's category word."""
    recall_weight: float = 1.0
    """Weight of the recall of the image's concepts among verified names."""
    hallucination_weight: float = 1.0
    """Weight of the fraction of named concepts the detector does not find."""
    batch_size: int = 8
    """(image, category) pairs per detector forward pass."""
    device: str = "cpu"
    """Torch device for the detector."""
    match_mode: str = "default"
    """Name matcher mode: "default" or "compat"."""
    case_sensitive: bool = False
    """Match names with exact letter case."""

    def __post_init__(self) -> None:
        if self.box_threshold < 0:
            raise ValueError(f"box_threshold: must be >= 0, got {self.box_threshold}")
        if self.text_threshold < 0:
            raise ValueError(f"text_threshold: must be >= 0, got {self.text_threshold}")
        if "{category}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template: must contain '{{category}}', got {self.prompt_template!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.match_mode not in MODES:
            raise ValueError(f"match_mode: must be one of {MODES}, got {self.match_mode!r}")


def unpack_detector(loaded: Any) -> tuple[Any, Any]:
    """(model, processor) from `load_detector`'s pair, whichever order it comes in."""
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        a, b = loaded
        return (a, b) if isinstance(a, torch.nn.Module) else (b, a)
    raise TypeError(f"expected a (model, processor) pair, got {type(loaded).__name__}")


def _category(x: RewardInput, name: str, index: int) -> str:
    """The category of `name`, also when `categories` is keyed "<Bo>" and the name is "Bo"."""
    category = lookup_name(x.categories, name)
    if category is not None:
        return category
    raise ValueError(
        f"sample {index} ({x.image_path}): categories has no entry for concept {name!r}"
    )


class DetectorReward:
    """Names in the caption must match entities the detector finds in the image.

    Components: "detector" (the reward), "detector/recall", "detector/hallucinated"
    (fraction of named concepts not found), "detector/named" (count).
    """

    def __init__(
        self,
        cfg: DetectorRewardConfig | None = None,
        model: Any = None,
        processor: Any = None,
        caption_tasks: Sequence[str] = CAPTION_TASKS,
    ) -> None:
        self.cfg = cfg or DetectorRewardConfig()
        self.caption_tasks = tuple(caption_tasks)
        if model is None or processor is None:
            from repic_ray.models.loading import load_detector

            model, processor = unpack_detector(load_detector(self.cfg.checkpoint))
        self.model = model.to(self.cfg.device).eval()
        self.processor = processor
        self._images: dict[str, Any] = {}

    def _image(self, path: str):
        from PIL import Image

        if path not in self._images:
            if len(self._images) > 256:
                self._images.clear()
            try:
                self._images[path] = Image.open(path).convert("RGB")
            except OSError as exc:
                raise ValueError(f"image_path {path!r}: cannot open image: {exc}") from exc
        return self._images[path]

    @torch.no_grad()
    def detect(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Best score per (image_path, category): the largest category-token score among
        queries that pass `box_threshold` (-inf when none passes)."""
        cfg = self.cfg
        tokenizer = self.processor.tokenizer
        out: dict[tuple[str, str], float] = {}
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = list(pairs[start : start + cfg.batch_size])
            images = [self._image(p) for p, _ in chunk]
            texts = [cfg.prompt_template.format(category=c) for _, c in chunk]
            enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
            enc = {k: v.to(cfg.device) if hasattr(v, "to") else v for k, v in enc.items()}
            logits = self.model(**enc).logits.float()  # (N, queries, max_text_len)
            probs = torch.sigmoid(logits)
            ids = enc["input_ids"]
            L = min(ids.shape[1], probs.shape[-1])
            probs, ids = probs[..., :L], ids[:, :L]
            valid = (
                enc["attention_mask"][:, :L].bool()
                if "attention_mask" in enc
                else torch.ones_like(ids).bool()
            )
            box_score = probs.masked_fill(~valid[:, None, :], 0.0).amax(-1)  # (N, queries)
            for row, (path, category) in enumerate(chunk):
                cat_ids = tokenizer(category, add_special_tokens=False)["input_ids"]
                cat_mask = valid[row] & torch.isin(
                    ids[row], torch.tensor(cat_ids, device=ids.device)
                )
                if not bool(cat_mask.any()):
                    raise ValueError(
                        f"category {category!r}: no token of it in prompt {texts[row]!r}"
                    )
                text_score = probs[row][:, cat_mask].amax(-1)  # (queries,)
                passing = box_score[row] >= cfg.box_threshold
                out[(path, category)] = (
                    float(text_score[passing].max()) if bool(passing.any()) else float("-inf")
                )
        return out

    def __call__(self, batch: Sequence[RewardInput]) -> RewardOutput:
        cfg = self.cfg
        B = len(batch)
        mask_B = caption_mask_B(batch, self.caption_tasks)
        named: list[list[str]] = [[] for _ in range(B)]
        pairs: dict[tuple[str, str], None] = {}
        for i, x in enumerate(batch):
            if not mask_B[i]:
                continue
            named[i] = find_names(
                x.completion,
                [*x.concept_names, *x.candidate_names],
                mode=cfg.match_mode,
                case_sensitive=cfg.case_sensitive,
            )
            if named[i] and x.image_path is None:
                raise ValueError(f"sample {i}: image_path is required by the detector reward")
            for name in named[i]:
                pairs[(x.image_path, _category(x, name, i))] = None
        scores = self.detect(list(pairs))
        reward_B, recall_B, halluc_B, named_B = (np.zeros(B) for _ in range(4))
        for i, x in enumerate(batch):
            if not mask_B[i]:
                continue
            verified = {
                name_key(n, cfg.case_sensitive)
                for n in named[i]
                if scores[(x.image_path, _category(x, n, i))] >= cfg.text_threshold
            }
            named_keys = {name_key(n, cfg.case_sensitive) for n in named[i]}
            gt = {name_key(n, cfg.case_sensitive) for n in x.concept_names}
            recall_B[i] = len(verified & gt) / len(gt) if gt else 0.0
            halluc_B[i] = len(named_keys - verified) / max(1, len(named_keys))
            named_B[i] = len(named_keys)
        reward_B = cfg.recall_weight * recall_B - cfg.hallucination_weight * halluc_B
        return RewardOutput(
            reward_B,
            {
                "detector": reward_B.copy(),
                "detector/recall": recall_B,
                "detector/hallucinated": halluc_B,
                "detector/named": named_B,
            },
        )
