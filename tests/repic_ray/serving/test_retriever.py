"""Retrieval on the tiny Grounding DINO and CLIP: crops, ranking, caching."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from PIL import Image

from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig
from repic_ray.serving.types import ReferenceConcept


def png(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def concept(name: str, colour: str, category: str = "dog") -> ReferenceConcept:
    data = png(colour)
    return ReferenceConcept(name, category, "", [data], [hashlib.sha256(data).hexdigest()])


@pytest.fixture(scope="module")
def retriever(tiny_retriever_models) -> ConceptRetriever:
    return ConceptRetriever(RetrieverConfig(box_threshold=0.0, max_crops=3),
                            *tiny_retriever_models)


def test_detect_returns_in_bounds_boxes_best_first(retriever):
    image = Image.new("RGB", (120, 80), "green")
    found = retriever.detect(image, ["dog", "cat", "dog"])
    assert 1 <= len(found) <= 3
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    for (x1, y1, x2, y2), _ in found:
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 80
    strict = ConceptRetriever(RetrieverConfig(box_threshold=1.0), retriever.detector,
                              retriever.detector_processor, retriever.clip,
                              retriever.clip_processor)
    assert strict.detect(image, ["dog"]) == []  # sigmoid scores never reach 1.0


def test_match_ranks_the_identical_reference_first(retriever):
    refs = [concept("Bo", "red"), concept("Mo", "blue", "cat"), concept("Zu", "yellow")]
    for colour, name in (("red", "Bo"), ("blue", "Mo"), ("yellow", "Zu")):
        matches = retriever.match(png(colour), refs, top_k=2)
        assert len(matches) == 2 and matches[0].name == name
        # cos(x, x) = 1 for the whole-image crop, which equals the reference image.
        torch.testing.assert_close(matches[0].score, 1.0, atol=1e-5, rtol=0)
        assert matches[0].score >= matches[1].score
    assert retriever.match(png("red"), [], top_k=2) == []


def test_reference_embeddings_are_cached_by_sha(retriever, monkeypatch):
    ref = concept("Bo", "purple")
    calls = []
    real = retriever.embed
    monkeypatch.setattr(retriever, "embed", lambda images: calls.append(len(images)) or real(images))
    first = retriever.reference_embeddings(ref)
    second = retriever.reference_embeddings(ref)
    torch.testing.assert_close(first, second)
    assert calls == [1]


def test_config_validation():
    with pytest.raises(ValueError, match="retriever.box_threshold"):
        RetrieverConfig(box_threshold=1.5)
    with pytest.raises(ValueError, match="retriever.max_crops"):
        RetrieverConfig(max_crops=-1)
