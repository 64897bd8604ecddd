"""Rollout scaling: throughput with 1, 2, 4, ... vLLM rollout workers (Ray actors).

Workers are created exactly as a training run creates them
(`actors.roles.create_rollout_workers`: one placement-group bundle per worker with the
role's resources) and the same requests are split across them as the driver splits a
step's prompts (`recipes.train.split_evenly`). Sampling is seeded per request, so every
worker count produces the very same completions: the work is identical, only its
distribution changes. Each worker count gets one warm-up round (excluded), then `--iters`
timed rounds; the workers are removed before the next count starts.

On a GPU cluster give each worker a GPU (`--set cluster.rollout.num_gpus 1`); on CPU each
worker reserves `cluster.rollout.num_cpus` logical CPUs, and the private cluster is sized
to fit the largest count even when the machine has fewer cores (then workers share cores).

    python bench/bench_scaling.py --workers 1,2,4 --prompts 16 --n 8 --out bench/results/scaling.json
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Stopwatch,
    base_parser,
    bench_config,
    finish,
    markdown_table,
    rollout_throughput,
    setup_env,
    world_requests,
)


def measure(cfg, count: int, requests: list, warmup: list, iters: int) -> dict:
    """Start `count` workers, warm each up, time `iters` rounds of all requests, remove them."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from actors.roles import create_rollout_workers
    from recipes.train import split_evenly

    cfg = copy.deepcopy(cfg)
    cfg.cluster.num_rollout_workers = count
    with Stopwatch() as start:
        workers, pg = create_rollout_workers(cfg)
        ray.get([w.pid.remote() for w in workers])  # engines built
    try:
        ray.get([w.generate.remote(warmup, cfg.sampling, None) for w in workers])
        results, seconds = [], 0.0
        for _ in range(iters):
            chunks = split_evenly(requests, count)
            with Stopwatch() as sw:
                outs = ray.get([w.generate.remote(c, cfg.sampling, None) for w, c in zip(workers, chunks) if c])
            results += [r for chunk in outs for r in chunk]
            seconds += sw.seconds
    finally:
        for w in workers:
            ray.kill(w)
        remove_placement_group(pg)
    out = rollout_throughput(results, seconds)
    out["workers"] = count
    out["startup_seconds"] = start.seconds
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--prompts", type=int, default=16, help="prompts per round (split across workers)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--iters", type=int, default=2, help="timed rounds per worker count")
    args = p.parse_args(argv)
    setup_env()
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--workers: expected positive counts, got {args.workers!r}")
    cfg = bench_config(args, ["--algo.group_size", str(args.n),
                              "--cluster.num_rollout_workers", str(max(counts))], name="bench_scaling")
    requests, _ = world_requests(cfg, args.prompts, args.n)
    warmup = [r.__class__(uid=f"warmup:{i}", prompt_text=r.prompt_text, image_paths=r.image_paths, n=r.n)
              for i, r in enumerate(requests[:1])]

    import ray

    from recipes.train import init_ray

    res = cfg.cluster.rollout
    if cfg.cluster.address == "local" and cfg.cluster.num_cpus is None:
        cfg.cluster.num_cpus = max(os.cpu_count() or 1, math.ceil(max(counts) * res.num_cpus))
    started = init_ray(cfg)
    try:
        rows = [measure(cfg, c, requests, warmup, args.iters) for c in counts]
        cluster = {"num_cpus_logical": ray.cluster_resources().get("CPU"),
                   "num_gpus": ray.cluster_resources().get("GPU", 0)}
    finally:
        if started:
            ray.shutdown()
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["samples_per_s"] / base
        r["efficiency"] = r["speedup_vs_first"] * counts[0] / r["workers"]
    setup = {"model": cfg.rollout.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
             "iters": args.iters, "rollout_num_cpus": res.num_cpus, "rollout_num_gpus": res.num_gpus, **cluster}
    table = markdown_table(
        ["workers", "samples/s", "tokens/s", f"speed-up vs {counts[0]}", "efficiency", "start s"],
        [[r["workers"], r["samples_per_s"], r["tokens_per_s"], r["speedup_vs_first"], r["efficiency"],
          r["startup_seconds"]] for r in rows],
    )
    finish({"setup": setup, "rows": rows}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
