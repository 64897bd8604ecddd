"""One vLLM rollout setting at a time: engine variants side by side on the same batches.

Each variant is the recipe's `VLLMRolloutEngine` with one thing changed; its CPU worker is
bound to one core, as `bench_rollout.py` finds best. Every variant generates every batch
(fresh prompts per round, vLLM's prefix and encoder caches reset before each call), the
variants alternating within a round; two warm-up batches per variant are excluded.
Reported: samples/s per call, min / median / max per variant, and the median of the
per-round ratios to the first variant.

    # the model compiled (torch.compile, the recipe's setting) vs run eagerly
    python bench/rollout_variants.py --variants eager,compiled --out bench/results/rollout_variants_compile.json
    # vLLM's incremental detokenizer on (a stop string that never occurs keeps it on) vs
    # off (the engine's default without stop strings: each completion decoded at the end)
    python bench/rollout_variants.py --variants detokenize,no_detokenize \
        --out bench/results/rollout_variants_detokenize.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_rollout import close_vllm, timed_call
from bench.common import base_parser, bench_config, finish, markdown_table, setup_env, spread, world_requests

VARIANTS = ("eager", "compiled", "detokenize", "no_detokenize")
NEVER = "\x00never\x00"


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--variants", default="eager,compiled", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--calls", type=int, default=10, help="timed calls per variant")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS) or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: distinct names of {VARIANTS}, got {args.variants!r}")
    if args.calls < 1 or args.prompts < 1 or args.n < 1:
        raise SystemExit("--calls, --prompts and --n must be >= 1")
    setup_env()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    from repic_ray.rollout.config import SamplingConfig
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    cfg = bench_config(args, ["--algo.group_size", str(args.n)])
    sampling = SamplingConfig(n=args.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                              max_tokens=args.max_tokens, seed=0)
    requests, _ = world_requests(cfg, args.prompts * (args.calls + 2), args.n)
    batches = [requests[i * args.prompts:(i + 1) * args.prompts] for i in range(args.calls + 2)]

    engines: dict[str, VLLMRolloutEngine] = {}
    settings: dict[str, SamplingConfig] = {}
    shared = None
    calls: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for v in variants:
            if v in ("eager", "compiled"):
                engines[v] = VLLMRolloutEngine(dataclasses.replace(cfg.rollout, enforce_eager=v == "eager"))
            else:
                shared = shared or VLLMRolloutEngine(cfg.rollout)
                engines[v] = shared
            settings[v] = dataclasses.replace(sampling, stop=[NEVER]) if v == "detokenize" else sampling
        for v in variants:
            for batch in batches[:2]:
                engines[v].generate(batch, settings[v])
        for batch in batches[2:]:
            for v in variants:
                calls[v].append(timed_call(engines[v], batch, settings[v]))
    finally:
        for engine in {id(e): e for e in engines.values()}.values():
            close_vllm(engine)

    results: dict = {"setup": {"model": cfg.rollout.model, "prompts": args.prompts, "n": args.n,
                               "max_tokens": args.max_tokens, "calls": args.calls, "variants": variants,
                               "recipe_enforce_eager": cfg.rollout.enforce_eager, "worker_cores": 1},
                     "calls": calls}
    first = variants[0]
    rows = []
    for v in variants:
        rate = spread([c["samples_per_s"] for c in calls[v]])
        ratio = spread([c["samples_per_s"] / f["samples_per_s"] for c, f in zip(calls[v], calls[first])])["median"]
        results[v] = {"samples_per_s": rate, "ratio_to_first_median": ratio,
                      "mean_completion_tokens": sum(c["mean_completion_tokens"] for c in calls[v]) / len(calls[v])}
        rows.append([v, rate["min"], rate["median"], rate["max"], ratio, results[v]["mean_completion_tokens"]])
    table = markdown_table(["variant", "samples/s min", "median", "max", f"/ {first} (median of rounds)",
                            "tokens/sample"], rows)
    finish(results, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
