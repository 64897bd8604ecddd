"""The serving benchmark's baseline: one uvicorn process, the project's API, HF `generate`
behind a dynamic batcher.

What a competent user without Ray Serve / vLLM would deploy: FastAPI with transformers
`generate`, batching the requests that arrive together (up to `--max-batch`, waiting at
most `--max-wait-ms` for a batch to fill) into one left-padded `generate` call, greedy,
the same prompt, model, dtype and token limit as the Serve captioner. It runs in its own
process (started by `bench/bench_serving.py`), with all cores' torch threads unless
`--threads` says otherwise.

    python bench/hf_batched_server.py --checkpoint tiny:qwen2.5-vl --root /tmp/store --port 8011
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repic_ray.serving.captioner import HFCaptioner, caption_text, prompt_images
from repic_ray.serving.types import CaptionResult, ReferenceConcept


class BatchedHFCaptioner(HFCaptioner):
    """`HFCaptioner` whose concurrent `caption` calls are grouped into batched `generate`s."""

    def __init__(self, config, max_batch: int = 8, max_wait_ms: float = 10.0):
        super().__init__(config)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._worker_lock = threading.Lock()

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options=None) -> CaptionResult:
        """Greedy caption (the benchmark sends no per-request options)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            loop.create_task(self._batcher())
        future = loop.create_future()
        await self._queue.put((query, concepts, future))
        return await future

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            try:
                captions = await asyncio.to_thread(self._generate, [(q, c) for q, c, _ in batch])
            except Exception as exc:  # noqa: BLE001 -- every waiting request gets the error
                for *_, fut in batch:
                    fut.set_exception(exc)
                continue
            for (*_, fut), text in zip(batch, captions):
                fut.set_result(CaptionResult(caption=text, model=self.version))

    def _generate(self, items: list[tuple[bytes, list[ReferenceConcept]]]) -> list[str]:
        import torch

        texts, images = [], []
        for query, concepts in items:
            texts.append(caption_text(concepts, self.processor))
            images += prompt_images(query, concepts, self.config.image_max_pixels)
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        self.batch_sizes.append(len(items))
        with self._worker_lock, torch.no_grad():
            base = getattr(self.model, "base_model", self.model)
            inner = getattr(base, "model", None)
            if inner is not None and hasattr(inner, "rope_deltas"):
                inner.rope_deltas = None
            out = self.model.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                bad_words_ids=[[t] for t in self.blocked] or None,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1]:]
        return [self.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="tiny:qwen2.5-vl")
    p.add_argument("--root", required=True, help="concept store directory")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    import torch
    import uvicorn

    from repic_ray.config import from_dict
    from repic_ray.serving.api import LocalBackend, build_app
    from repic_ray.serving.config import ServeConfig
    from repic_ray.serving.retriever import ConceptRetriever
    from repic_ray.serving.store import ConceptStore, StoreConfig

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = from_dict(ServeConfig, {
        "captioner": {"checkpoint": args.checkpoint, "max_new_tokens": args.max_new_tokens,
                      "max_model_len": 2048},
        "retriever": {"box_threshold": 0.0},
    })
    captioner = BatchedHFCaptioner(cfg.captioner, args.max_batch, args.max_wait_ms)
    store = ConceptStore(StoreConfig(root=args.root))
    app = build_app(store, LocalBackend(ConceptRetriever(cfg.retriever), captioner), cfg.api)

    @app.get("/bench/batches")
    def batches() -> dict:
        sizes = captioner.batch_sizes
        return {"batches": len(sizes), "mean_batch": sum(sizes) / max(len(sizes), 1),
                "threads": torch.get_num_threads()}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
