"""Serve + vLLM versus a plain FastAPI server calling HF `generate`, same model.

Both run the same API (`repic_ray.serving.api.build_app`), store, retriever and
prompt; they differ only in serving: the baseline is one uvicorn process whose
captioner runs transformers `generate` one request at a time, the Serve app sends
captions to a vLLM async engine that batches concurrent requests. Each is loaded
with `bench/loadtest.py` at the same concurrency, one after the other (the two
never compete for the CPU), on loopback.

    python bench/bench_serving.py --checkpoint tiny:qwen2.5-vl --concurrency 8 --requests 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadtest import register, run_load
from repic_ray.config import from_dict
from repic_ray.serving.config import ServeConfig
from repic_ray.serving.store import ConceptStore, StoreConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_key(root: Path) -> dict:
    store = ConceptStore(StoreConfig(root=str(root)))
    store.create_user("bench")
    key = store.create_api_key("bench")
    store.close()
    return {"X-API-Key": key}


def _wait(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def _load(url: str, headers: dict, args: argparse.Namespace) -> dict:
    register(url, headers, ["Bo"])
    # One warm-up request, then the measured run.
    asyncio.run(run_load(url, headers, concurrency=1, requests=1, concepts=["Bo"]))
    result = asyncio.run(run_load(url, headers, concurrency=args.concurrency,
                                  requests=args.requests, concepts=["Bo"]))
    return asdict(result)


def bench_plain(cfg: ServeConfig, args: argparse.Namespace) -> dict:
    import uvicorn

    from repic_ray.serving.api import LocalBackend, build_app
    from repic_ray.serving.captioner import HFCaptioner
    from repic_ray.serving.retriever import ConceptRetriever

    root = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    store = ConceptStore(StoreConfig(root=str(root)))
    backend = LocalBackend(ConceptRetriever(cfg.retriever), HFCaptioner(cfg.captioner))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(store, backend, cfg.api), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url)
        return _load(url, _user_key(root), args)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def bench_serve(cfg: ServeConfig, args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from deploy.serve_app import application

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg.store = StoreConfig(root=str(root))
    port = _free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(cfg), name="repic", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        return _load(url, _user_key(root), args)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="tiny:qwen2.5-vl")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    cfg = from_dict(ServeConfig, {
        "captioner": {"checkpoint": args.checkpoint, "max_new_tokens": args.max_new_tokens,
                      "max_model_len": 2048},
        "retriever": {"box_threshold": 0.0},
    })
    results = {"plain_fastapi_hf_generate": bench_plain(cfg, args),
               "ray_serve_vllm": bench_serve(cfg, args)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
