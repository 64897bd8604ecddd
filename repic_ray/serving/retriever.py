"""Find a user's concepts in a query image: Grounding DINO crops + CLIP embeddings.

RePIC's retrieval mode (after RAP): an open-set detector proposes object crops
for the categories of the user's concepts, each with a score per category phrase;
each crop and each reference image is embedded with CLIP; a concept's score is its
best cosine similarity between a crop the detector finds likely enough to be of the
concept's category (`category_ratio`) and any of its reference images, and the
top-K concepts by score go into the prompt, each with the box of its best crop. The whole image is always one of the
crops, so a concept can still be retrieved when the detector finds nothing (its
box is then the whole image).

Reference embeddings are cached by image sha256, so a concept's references are
embedded once per replica.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from repic_ray.data.images import image_from_bytes
from repic_ray.serving.types import Match, ReferenceConcept


@dataclass
class RetrieverConfig:
    """Detector and embedder of the retrieval step."""

    detector: str = "checkpoints/tiny-gdino"
    """Grounding DINO spec for `repic_ray.models.loading.load_detector`: the shipped tiny
    detector trained on the synthetic world (default), a real one such as
    "IDEA-Research/grounding-dino-tiny", or "tiny:grounding-dino" (random weights)."""
    clip: str = "checkpoints/tiny-clip"
    """CLIP spec for `repic_ray.models.loading.load_clip`: the shipped tiny CLIP trained on
    the synthetic world (default), a real one such as "openai/clip-vit-large-patch14-336",
    or "tiny:clip" (random weights)."""
    box_threshold: float = 0.2
    """Minimum detection score (best text-token sigmoid) of a crop. Below Grounding DINO's
    usual 0.3: crops are ranked by CLIP afterwards and at most `max_crops` are kept, so a
    low threshold costs a few crops, while a high one loses the concept (the shipped tiny
    detector's scores on its objects are 0.2-0.6: retrieval 85 % at 0.3, 93 % at 0.2)."""
    max_crops: int = 8
    """Detected crops kept per query image (highest scores first)."""
    category_ratio: float = 0.5
    """A box is a candidate for a concept when its score for the concept's category is at
    least this fraction of its best category score (1: its best category only; 0: any box)."""
    cache_size: int = 4096
    """Reference-image embeddings kept in memory."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_threshold <= 1.0:
            raise ValueError(f"retriever.box_threshold: must be in [0, 1], got {self.box_threshold}")
        if self.max_crops < 0:
            raise ValueError(f"retriever.max_crops: must be >= 0, got {self.max_crops}")
        if self.cache_size < 1:
            raise ValueError(f"retriever.cache_size: must be >= 1, got {self.cache_size}")


def _model_and_processor(loaded: tuple[Any, Any]) -> tuple[Any, Any]:
    """`load_detector`/`load_clip` return `(processor, model)`; order them by kind."""
    a, b = loaded
    return (a, b) if isinstance(a, torch.nn.Module) else (b, a)


def _embeddings(out: Any) -> torch.Tensor:
    """`get_image_features` returns a tensor in some transformers versions and a
    model output (projected embedding in `pooler_output`) in others."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find image embeddings in {type(out).__name__}")


class ConceptRetriever:
    """Scores a user's concepts against a query image."""

    def __init__(self, config: RetrieverConfig, detector: Any = None,
                 detector_processor: Any = None, clip: Any = None, clip_processor: Any = None):
        self.config = config
        if detector is None or detector_processor is None:
            from repic_ray.models.loading import load_detector

            detector, detector_processor = _model_and_processor(load_detector(config.detector))
        if clip is None or clip_processor is None:
            from repic_ray.models.loading import load_clip

            clip, clip_processor = _model_and_processor(load_clip(config.clip))
        self.detector = detector.eval()
        self.detector_processor = detector_processor
        self.clip = clip.eval()
        self.clip_processor = clip_processor
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    # -- steps -------------------------------------------------------------

    def detect(self, image: Image.Image, categories: list[str]) -> list[tuple[list[float], float]]:
        """Boxes ([x1, y1, x2, y2] pixels) and scores of objects of `categories`,
        best first, at most `max_crops`, each scoring >= `box_threshold`."""
        return [(box, score) for box, score, _ in self.detect_phrases(image, categories)]

    @torch.no_grad()
    def detect_phrases(self, image: Image.Image, categories: list[str]
                       ) -> list[tuple[list[float], float, dict[str, float]]]:
        """`detect` with each box's score for each category phrase (lower-cased)."""
        from repic_ray.models.perception import phrase_scores, phrase_spans

        if not categories or self.config.max_crops == 0:
            return []
        phrases = list(dict.fromkeys(c.lower() for c in categories))
        enc = self.detector_processor(images=image, text=". ".join(phrases) + ".",
                                      return_tensors="pt")
        out = self.detector(**enc)
        probs_QT = torch.sigmoid(out.logits[0].float())  # (queries, text tokens)
        n_text = int(enc["attention_mask"][0].sum()) if "attention_mask" in enc else probs_QT.shape[1]
        probs_QT = probs_QT[:, : min(n_text, probs_QT.shape[1])]
        labels = phrase_scores(probs_QT, phrase_spans(self.detector_processor.tokenizer, phrases))
        score_Q = probs_QT.amax(-1)
        keep = (score_Q >= self.config.box_threshold).nonzero().flatten()
        keep = keep[score_Q[keep].argsort(descending=True)][: self.config.max_crops]
        w, h = image.size
        boxes = []
        for q in keep.tolist():
            cx, cy, bw, bh = out.pred_boxes[0, q].float().tolist()  # normalised centre/size
            x1, y1 = max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h)
            x2, y2 = min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h)
            if x2 - x1 >= 2 and y2 - y1 >= 2:
                boxes.append(([round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                              float(score_Q[q]), labels[q]))
        return boxes

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, (N, D)."""
        enc = self.clip_processor(images=images, return_tensors="pt")
        emb = _embeddings(self.clip.get_image_features(pixel_values=enc["pixel_values"]))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def reference_embeddings(self, concept: ReferenceConcept) -> torch.Tensor:
        """(images of the concept, D), cached by image sha256."""
        keys = concept.image_sha256 or [None] * len(concept.images)
        missing = [i for i, k in enumerate(keys) if k is None or k not in self._cache]
        if missing:
            fresh = self.embed([image_from_bytes(concept.images[i], name=f"reference of "
                                                 f"{concept.name}") for i in missing])
            for row, i in enumerate(missing):
                if keys[i] is not None:
                    self._cache[keys[i]] = fresh[row]
                    while len(self._cache) > self.config.cache_size:
                        self._cache.popitem(last=False)
            by_index = dict(zip(missing, fresh))
        else:
            by_index = {}
        rows = []
        for i, k in enumerate(keys):
            if i in by_index:
                rows.append(by_index[i])
            else:
                self._cache.move_to_end(k)
                rows.append(self._cache[k])
        return torch.stack(rows)

    # -- the whole step ----------------------------------------------------

    def match(self, query: bytes, concepts: list[ReferenceConcept], top_k: int) -> list[Match]:
        """The `top_k` concepts most similar to some crop of `query`, best first."""
        if not concepts:
            return []
        image = image_from_bytes(query, name="query")
        with self._lock:  # the embedding cache and the models are shared by threads
            detections = self.detect_phrases(image, [c.category for c in concepts])
            w, h = image.size
            crops = [([0.0, 0.0, float(w), float(h)], 0.0, {}), *detections]
            crop_emb_CD = self.embed([image.crop(tuple(round(v) for v in box))
                                      for box, _, _ in crops])
            ratio = self.config.category_ratio
            matches = []
            for concept in concepts:
                # A concept is looked for in the boxes of its own category (and the whole
                # image): a box the detector scores as a lamp far above a dog is not a
                # candidate for a dog.
                cat = concept.category.lower()
                rows = [0] + [i for i, (_, score, by_phrase) in enumerate(crops)
                              if i and by_phrase.get(cat, 0.0) >= ratio * score]
                ref_RD = self.reference_embeddings(concept)
                best_C = (crop_emb_CD[rows] @ ref_RD.T).amax(-1)
                # Prefer a detected crop over the whole-image fallback on ties.
                c = rows[len(rows) - 1 - int(best_C.flip(0).argmax())]
                matches.append(Match(name=concept.name, score=float(best_C[rows.index(c)]),
                                     box=list(crops[c][0])))
        matches.sort(key=lambda m: -m.score)
        return matches[:top_k]
