"""Messages between the API, the retriever and the captioner (plain dataclasses,
picklable, so they cross Ray Serve handles unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReferenceConcept:
    """A user's concept as the models see it: name, description and image bytes."""

    name: str
    category: str
    info: str
    images: list[bytes]
    image_sha256: list[str] = field(default_factory=list)
    """Content hashes of `images` (same order); the retriever caches embeddings by them."""


@dataclass
class Match:
    """A concept found in the query image."""

    name: str
    score: float
    """Cosine similarity of the best detected crop with the concept's references."""
    box: list[float] | None
    """[x1, y1, x2, y2] in query-image pixels; None when nothing was detected."""


@dataclass
class CaptionResult:
    caption: str
    model: str
    """Model version: checkpoint (and adapter) that wrote the caption."""
