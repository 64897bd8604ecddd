"""Ray Serve application of the personalized captioner.

Three deployments, each with its own autoscaling config (deploy/serve.yaml):

    HTTP ──> Api (FastAPI ingress: auth, concept store, limits)
               ├──> Retriever (Grounding DINO crops + CLIP -> nearest concepts)
               └──> Captioner (vLLM async engine: continuous batching across requests)

The deployments are thin: the logic is `repic_ray.serving` (plain classes, tested
without Ray). Start with `serve run deploy/serve.yaml` or
`repic serve --checkpoint DIR [--config deploy/serve.yaml]`.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from repic_ray.config import from_dict, to_dict
from repic_ray.serving.api import build_app
from repic_ray.serving.captioner import CaptionerConfig, HFCaptioner, VLLMCaptioner
from repic_ray.serving.config import ServeConfig
from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig
from repic_ray.serving.store import ConceptStore
from repic_ray.serving.types import (
    CaptionDelta,
    CaptionOptions,
    CaptionResult,
    Match,
    ModelInfo,
    ReferenceConcept,
)

# Defaults for a small CPU cluster; deploy/serve.yaml (or `repic serve --config`)
# overrides them per deployment.
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "Api": {
        "ray_actor_options": {"num_cpus": 0.1},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                               "target_ongoing_requests": 16},
        "max_ongoing_requests": 64,
    },
    "Retriever": {
        "ray_actor_options": {"num_cpus": 0.5},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                               "target_ongoing_requests": 4},
        "max_ongoing_requests": 16,
    },
    "Captioner": {
        "ray_actor_options": {"num_cpus": 1},
        # An engine that cannot start (e.g. too little memory for its KV cache) fails
        # the same way again: fail the deployment, and with it `serve.run`, at once.
        "max_constructor_retry_count": 1,
        # One engine batches everything it holds; scale out only under a deep queue.
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1,
                               "target_ongoing_requests": 16},
        "max_ongoing_requests": 32,
    },
}


@serve.deployment(name="Captioner")
class Captioner:
    """One caption engine per replica (vLLM async by default)."""

    def __init__(self, config: dict[str, Any], engine: str = "vllm"):
        cfg = from_dict(CaptionerConfig, config)
        self.engine = VLLMCaptioner(cfg) if engine == "vllm" else HFCaptioner(cfg)
        self._hf_lock = asyncio.Lock()

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options: CaptionOptions | None = None) -> CaptionResult:
        if isinstance(self.engine, VLLMCaptioner):
            return await self.engine.caption(query, concepts, options)
        async with self._hf_lock:
            return await asyncio.to_thread(self.engine.caption, query, concepts, options)

    async def caption_stream(self, query: bytes, concepts: list[ReferenceConcept],
                             options: CaptionOptions | None = None
                             ) -> AsyncIterator[CaptionDelta]:
        """Streamed through the handle (`options(stream=True)`): the vLLM engine's
        pieces as it generates them; the HF engine's caption as one piece."""
        if isinstance(self.engine, VLLMCaptioner):
            async for delta in self.engine.caption_stream(query, concepts, options):
                yield delta
            return
        result = await self.caption(query, concepts, options)
        yield CaptionDelta(result.caption, result)

    def models(self) -> list[ModelInfo]:
        return [self.engine.model_info()]

    async def ready(self) -> None:
        """Answers once the engine is built (the constructor returned)."""


@serve.deployment(name="Retriever")
class Retriever:
    def __init__(self, config: dict[str, Any]):
        self.retriever = ConceptRetriever(from_dict(RetrieverConfig, config))

    async def match(self, query: bytes, concepts: list[ReferenceConcept], top_k: int
                    ) -> list[Match]:
        return await asyncio.to_thread(self.retriever.match, query, concepts, top_k)


class HandleBackend:
    """The API's `Backend` over the two deployments' handles."""

    def __init__(self, captioner: DeploymentHandle, retriever: DeploymentHandle):
        self.captioner = captioner
        self.retriever = retriever

    async def match(self, query: bytes, concepts: list[ReferenceConcept], top_k: int
                    ) -> list[Match]:
        return await self.retriever.match.remote(query, concepts, top_k)

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options: CaptionOptions | None = None) -> CaptionResult:
        return await self.captioner.caption.remote(query, concepts, options)

    async def caption_stream(self, query: bytes, concepts: list[ReferenceConcept],
                             options: CaptionOptions | None = None
                             ) -> AsyncIterator[CaptionDelta]:
        stream = self.captioner.options(stream=True).caption_stream.remote(
            query, concepts, options)
        async for delta in stream:
            yield delta

    async def models(self) -> list[ModelInfo]:
        return await self.captioner.models.remote()

    async def ready(self) -> None:
        await self.captioner.ready.remote()


@serve.deployment(name="Api")
@serve.ingress()
class Api:
    """FastAPI ingress; every replica opens the shared concept store."""

    def __init__(self, captioner: DeploymentHandle, retriever: DeploymentHandle,
                 config: dict[str, Any]):
        self.config = from_dict(ServeConfig, config)
        self.store = ConceptStore(self.config.store)
        self._asgi = build_app(self.store, HandleBackend(captioner, retriever), self.config.api)

    def __serve_build_asgi_app__(self):
        return self._asgi


def application(config: ServeConfig, deployments: dict[str, dict[str, Any]] | None = None):
    """The bound application; `deployments` overrides DEPLOYMENT_DEFAULTS by name."""
    opts = copy.deepcopy(DEPLOYMENT_DEFAULTS)
    for name, override in (deployments or {}).items():
        if name not in opts:
            raise ValueError(f"deployments: unknown deployment {name!r} "
                             f"(expected one of {sorted(opts)})")
        opts[name].update(override)
    captioner = Captioner.options(**opts["Captioner"]).bind(
        to_dict(config.captioner), config.engine)
    retriever = Retriever.options(**opts["Retriever"]).bind(to_dict(config.retriever))
    return Api.options(**opts["Api"]).bind(captioner, retriever, to_dict(config))


def app_builder(args: dict[str, Any]):
    """Entry point of `serve run deploy/serve.yaml` (`import_path:
    deploy.serve_app:app_builder`); `args` are the ServeConfig fields. Per-deployment
    options come from the YAML's `deployments:` list, which Serve applies itself."""
    return application(from_dict(ServeConfig, dict(args or {})))
