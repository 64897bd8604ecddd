"""Bounded load test of the captioning API, loopback only.

Sends `--requests` caption requests with at most `--concurrency` in flight to a
server on 127.0.0.1/localhost and reports throughput and p50/p99 latency; any
non-200 answer counts as an error (zero expected). The target user needs the
concepts named with `--concepts`; `--register` creates them from generated images.

    python bench/loadtest.py --url http://127.0.0.1:8000 --api-key rk_... \
        --concurrency 8 --requests 64 --register
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx
from PIL import Image

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 10_000
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_s: float
    p99_s: float
    first_error: str = ""
    captions: list[str] = field(default_factory=list)


def png(colour: str, size: tuple[int, int] = (84, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"--url: only loopback targets are allowed, got host {host!r}")


def register(url: str, headers: dict, names: list[str]) -> None:
    for i, name in enumerate(names):
        res = httpx.post(f"{url}/v1/concepts", headers=headers, data={"name": name},
                         files=[("images", (f"{name}.png", png(COLOURS[i % 8]), "image/png"))])
        if res.status_code not in (201, 409):
            raise SystemExit(f"registering {name}: {res.status_code} {res.text}")


async def run_load(url: str, headers: dict, *, concurrency: int, requests: int,
                   concepts: list[str], top_k: int | None = None,
                   timeout_s: float = 600.0) -> LoadResult:
    """Send `requests` caption requests, `concurrency` at a time."""
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests: must be in 1..{MAX_REQUESTS}, got {requests}")
    if concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    check_loopback(url)
    images = [png(c) for c in COLOURS]
    data = {"concepts": ",".join(concepts)} if concepts else {"top_k": str(top_k or 1)}
    latencies: list[float] = []
    captions: list[str] = []
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                res = await client.post(
                    f"{url}/v1/captions", headers=headers, data=data,
                    files={"image": ("q.png", images[i % len(images)], "image/png")})
                ok = res.status_code == 200
                if ok:
                    captions.append(res.json()["caption"])
                else:
                    errors.append(f"{res.status_code}: {res.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                errors.append(f"{type(exc).__name__}: {exc}")
            if ok:
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    return LoadResult(
        requests=requests, concurrency=concurrency, errors=len(errors), seconds=elapsed,
        throughput_rps=len(latencies) / elapsed, p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99), first_error=errors[0] if errors else "",
        captions=captions,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concepts", default="Bo", help="comma-separated; empty: retrieval")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--register", action="store_true", help="create the concepts first")
    args = p.parse_args(argv)
    check_loopback(args.url)
    headers = {"X-API-Key": args.api_key}
    names = [n for n in args.concepts.split(",") if n]
    if args.register:
        register(args.url, headers, names)
    result = asyncio.run(run_load(args.url, headers, concurrency=args.concurrency,
                                  requests=args.requests, concepts=names, top_k=args.top_k))
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "captions"}, indent=2))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
