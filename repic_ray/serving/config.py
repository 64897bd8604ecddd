"""Configuration of the captioning service, composed from each part's dataclass.

The same settings are the `args` of the application in `deploy/serve.yaml`, so
`serve run deploy/serve.yaml` and `repic serve --config deploy/serve.yaml` read
one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repic_ray.serving.api import ApiConfig
from repic_ray.serving.captioner import CaptionerConfig
from repic_ray.serving.retriever import RetrieverConfig
from repic_ray.serving.store import StoreConfig

ENGINES = ("vllm", "hf")


@dataclass
class ServeConfig:
    """Everything the Serve application needs (its `args` in deploy/serve.yaml)."""

    store: StoreConfig = field(default_factory=StoreConfig)
    """Database and image directory."""
    api: ApiConfig = field(default_factory=ApiConfig)
    """HTTP API behaviour and limits."""
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    """Captioning model."""
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """Detector and CLIP of the retrieval step."""
    engine: str = "vllm"
    """Captioning engine: "vllm" (async engine, continuous batching) or "hf"
    (transformers generate, one request at a time)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {ENGINES}, got {self.engine!r}")
