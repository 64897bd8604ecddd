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
    prompt_tokens: int = 0
    """Tokens of the prompt as the engine counted them (images included)."""
    completion_tokens: int = 0
    """Tokens generated."""
    finish_reason: str = "stop"
    """"stop" (end of sequence) or "length" (hit the token limit)."""


@dataclass
class CaptionOptions:
    """How one caption is written (the request's question and decoding settings)."""

    question: str = ""
    """The question after the query image; empty: the default caption question (with
    the name suffix when concepts are given), as in training."""
    max_tokens: int | None = None
    """Caption length limit; None: the captioner's `max_new_tokens`."""
    temperature: float = 0.0
    """0 decodes greedily."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the sampler (temperature > 0); None: unseeded."""

    def checked(self, max_tokens: int) -> CaptionOptions:
        """These options, if a captioner writing at most `max_tokens` tokens can honour
        them; else ValueError naming the field."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= max_tokens:
            raise ValueError(f"max_tokens: must be in 1..{max_tokens} (the longest caption "
                             f"this model writes), got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class CaptionDelta:
    """A piece of a streamed caption; the last piece carries the whole result."""

    text: str
    result: CaptionResult | None = None


@dataclass
class ModelInfo:
    """A model the captioner serves."""

    id: str
    """Model version, as reported with each caption."""
    max_tokens: int
    """Longest caption it writes, in tokens."""
    created: int = 0
    """Unix time the model was loaded."""
