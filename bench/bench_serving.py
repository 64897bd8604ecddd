"""Serve + vLLM versus a FastAPI server with a dynamically batching HF `generate`, same model.

Both run the same API (`repic_ray.serving.api.build_app`), store, retriever and prompt;
they differ only in serving. The baseline (`bench/hf_batched_server.py`) is one uvicorn
process of its own whose captioner groups concurrent requests into batched transformers
`generate` calls (what a user without Serve/vLLM would deploy); the Serve app sends
captions to a vLLM async engine that batches continuously. Both servers are started,
warmed up, then loaded with `bench/loadtest.py` in `--rounds` rounds that alternate the
systems (Serve, baseline, Serve, baseline, ...), never at the same time, on loopback.
Reported per system: throughput and p50 / p99 latency per round (min / median / max over
rounds), completion tokens per request (the returned captions, tokenized) and errors.

    python bench/bench_serving.py --checkpoint checkpoints/tiny-sft --concurrency 8 --requests 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import finish, markdown_table, setup_env, spread
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


def _wait(url: str, timeout: float = 600, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the baseline server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def _load(url: str, headers: dict, args: argparse.Namespace) -> dict:
    result = asyncio.run(run_load(url, headers, concurrency=args.concurrency,
                                  requests=args.requests, concepts=["Bo"]))
    return asdict(result)


def _warm(url: str, headers: dict, args: argparse.Namespace) -> None:
    register(url, headers, ["Bo"])
    asyncio.run(run_load(url, headers, concurrency=args.concurrency, requests=args.concurrency,
                         concepts=["Bo"]))


@contextlib.contextmanager
def plain_server(args: argparse.Namespace):
    """The batched HF baseline in its own process: yields (url, headers, process)."""
    root = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    headers = _user_key(root)
    port = _free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("hf_batched_server.py")), "--checkpoint",
           args.checkpoint, "--root", str(root), "--port", str(port), "--max-new-tokens",
           str(args.max_new_tokens), "--max-batch", str(args.concurrency)]
    if args.baseline_threads:
        cmd += ["--threads", str(args.baseline_threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc=proc)
        yield url, headers
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def serve_server(cfg: ServeConfig):
    """The Ray Serve app on a private local Ray cluster: yields (url, headers)."""
    import ray
    from ray import serve

    from deploy.serve_app import application

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg.store = StoreConfig(root=str(root))
    headers = _user_key(root)
    port = _free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(cfg), name="repic", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        yield url, headers
    finally:
        serve.shutdown()
        ray.shutdown()


def summarize(rounds: list[dict], tokenizer) -> dict:
    """Per-system spread over rounds, and completion tokens per request."""
    tokens = [len(tokenizer(c)["input_ids"]) for r in rounds for c in r["captions"]]
    return {
        "throughput_rps": spread([r["throughput_rps"] for r in rounds]),
        "p50_s": spread([r["p50_s"] for r in rounds]),
        "p99_s": spread([r["p99_s"] for r in rounds]),
        "errors": sum(r["errors"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "completion_tokens_per_request": sum(tokens) / max(len(tokens), 1),
        "first_error": next((r["first_error"] for r in rounds if r["first_error"]), ""),
        "sample_captions": [r["captions"][0] for r in rounds if r["captions"]][:3],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/tiny-sft")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="requests per round and system")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch threads of the baseline process (default: all cores)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        raise SystemExit("--rounds and --requests must be >= 1")
    setup_env()
    cfg = from_dict(ServeConfig, {
        "captioner": {"checkpoint": args.checkpoint, "max_new_tokens": args.max_new_tokens,
                      "max_model_len": 2048},
        "retriever": {"box_threshold": 0.0},
    })
    from repic_ray.models.loading import load_processor, resolve_checkpoint

    tokenizer = load_processor(resolve_checkpoint(args.checkpoint)).tokenizer
    rounds: dict[str, list[dict]] = {"ray_serve_vllm": [], "fastapi_hf_batched": []}
    with serve_server(cfg) as (serve_url, serve_headers), plain_server(args) as (plain_url, plain_headers):
        _warm(serve_url, serve_headers, args)
        _warm(plain_url, plain_headers, args)
        for _ in range(args.rounds):
            rounds["ray_serve_vllm"].append(_load(serve_url, serve_headers, args))
            rounds["fastapi_hf_batched"].append(_load(plain_url, plain_headers, args))
        batches = httpx.get(f"{plain_url}/bench/batches", timeout=10).json()
    results: dict = {name: summarize(r, tokenizer) for name, r in rounds.items()}
    results["fastapi_hf_batched"]["batching"] = batches
    for r in rounds.values():
        for one in r:
            del one["captions"]
    results["rounds"] = rounds
    serve_r, plain_r = rounds["ray_serve_vllm"], rounds["fastapi_hf_batched"]
    results["throughput_ratio_median"] = spread(
        [a["throughput_rps"] / b["throughput_rps"] for a, b in zip(serve_r, plain_r)])["median"]
    results["p99_ratio_median"] = spread([a["p99_s"] / b["p99_s"] for a, b in zip(serve_r, plain_r)])["median"]
    setup = {"checkpoint": args.checkpoint, "concurrency": args.concurrency, "requests": args.requests,
             "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
             "baseline_threads": batches["threads"], "baseline_max_batch": args.concurrency}
    rows = [[name, r["throughput_rps"]["median"], r["p50_s"]["median"], r["p99_s"]["median"],
             r["p99_s"]["max"], r["completion_tokens_per_request"], r["errors"]]
            for name, r in results.items() if name in rounds]
    table = markdown_table(["system", "req/s (median)", "p50 s", "p99 s (median)", "p99 s (max)",
                            "tokens/request", "errors"], rows)
    table += (f"\n\nServe / baseline: {results['throughput_ratio_median']:.2f}x throughput, "
              f"{results['p99_ratio_median']:.2f}x p99 (medians over {args.rounds} rounds)")
    finish({"setup": setup, **results}, table, args.out)
    return 1 if any(r["errors"] for r in results.values() if isinstance(r, dict) and "errors" in r) else 0


if __name__ == "__main__":
    sys.exit(main())
