"""Rollout throughput: our vLLM engine vs the transformers `generate` engine, same prompts.

Both engines (`repic_ray.rollout.VLLMRolloutEngine`, `HFRolloutEngine`) get the same RePIC
multi-image prompts from the synthetic world, the same sampling settings (n samples per
prompt, temperature, top_p, max_tokens, seed, vision tokens blocked) and the same model in
the same dtype. Both engines are loaded, each runs one warm-up batch (excluded), then
`--iters` timed batches per engine, alternating (vLLM, HF, vLLM, HF, ...): never at the same
time. Every timed batch holds prompts no earlier call has seen (so neither engine's prefix
or multimodal cache serves repeats), and vLLM's prefix and encoder caches are reset before
each timed call, as after every weight update in training. HF `generate` runs with the
better of 1 and 2 torch threads, the vLLM engine's CPU worker on the better of 1 and 2 cores
(each measured on the warm-up batch) and keeps only the per-step
scores its log-probs need. Reported: min / median / max samples/s over the timed
batches, the median completion tokens/s (tokens actually generated: completions stop at
end-of-sequence, so lengths differ between engines and runs) and the median of the
per-pair ratios.

    python bench/bench_rollout.py --prompts 16 --n 8 --max-tokens 96 --iters 5 --out bench/results/rollout.json
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from bench.common import (
    Stopwatch,
    base_parser,
    bench_config,
    finish,
    markdown_table,
    rollout_throughput,
    setup_env,
    spread,
    world_requests,
)


def timed_call(engine, requests: list, sampling) -> dict:
    """One timed `generate` over `requests` (vLLM's caches reset first, outside the clock)."""
    if hasattr(engine, "llm"):
        engine.llm.reset_prefix_cache()
        engine.llm.llm_engine.reset_encoder_cache()
    with Stopwatch() as sw:
        out = engine.generate(requests, sampling)
    return rollout_throughput(out, sw.seconds)


def pick_threads(engine, warmup: list, sampling, choices: Sequence[int]) -> int:
    """The torch thread count (of `choices`) under which `engine`'s warm-up batch ran fastest."""
    import torch

    best, best_s = choices[0], float("inf")
    for threads in choices:
        torch.set_num_threads(threads)
        engine.generate(warmup, sampling)  # first call per setting pays one-off costs
        with Stopwatch() as sw:
            engine.generate(warmup, sampling)
        if sw.seconds < best_s:
            best, best_s = threads, sw.seconds
    torch.set_num_threads(best)
    return best


def close_vllm(engine) -> None:
    engine.close()
    engine.llm.llm_engine.engine_core.shutdown()


def pick_vllm_cores(rollout_cfg, warmup: list, sampling, choices: Sequence[int]):
    """(cores, engine, warm-up seconds per choice): a vLLM engine per core count, its CPU
    worker bound to cores 0..c-1; the one that ran the warm-up batch fastest is kept."""
    import os

    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    usable = [c for c in choices if 1 <= c <= (os.cpu_count() or 1)] or [1]
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    best = None
    seconds: dict[str, float] = {}
    try:
        for cores in usable:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if cores == 1 else f"0-{cores - 1}"
            engine = VLLMRolloutEngine(rollout_cfg)
            engine.generate(warmup, sampling)  # first call pays one-off costs
            seconds[str(cores)] = timed_call(engine, warmup, sampling)["seconds"]
            if best is None or seconds[str(cores)] < seconds[str(best[0])]:
                if best is not None:
                    close_vllm(best[1])
                best = (cores, engine)
            else:
                close_vllm(engine)
    finally:
        if previous is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    return best[0], best[1], seconds


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (RePIC: 8)")
    p.add_argument("--iters", type=int, default=5, help="timed batches per engine (alternating)")
    p.add_argument("--engines", default="vllm,hf", help="comma-separated subset of vllm,hf")
    p.add_argument("--hf-threads", default="1,2", help="torch thread counts to try for HF generate")
    p.add_argument("--vllm-cores", default="1,2",
                   help="cores to try for the vLLM engine's CPU worker (VLLM_CPU_OMP_THREADS_BIND 0, 0-1, "
                        "...); the setting faster on the warm-up batch is timed")
    args = p.parse_args(argv)
    setup_env()
    from repic_ray.rollout.config import SamplingConfig

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"vllm", "hf"}
    if unknown or not engines:
        raise SystemExit(f"--engines: expected a subset of vllm,hf, got {args.engines!r}")
    if args.iters < 1 or args.prompts < 1 or args.n < 1:
        raise SystemExit("--iters, --prompts and --n must be >= 1")
    cfg = bench_config(args, ["--algo.group_size", str(args.n)])
    sampling = SamplingConfig(n=args.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                              max_tokens=args.max_tokens, seed=0)
    # Fresh prompts for every timed call (the same batch per pair, so both engines get it).
    requests, _ = world_requests(cfg, args.prompts * (args.iters + 1), args.n)
    warmup, batches = requests[:args.prompts], [
        requests[(i + 1) * args.prompts:(i + 2) * args.prompts] for i in range(args.iters)]

    loaded: dict = {}
    setup: dict = {}
    try:
        if "vllm" in engines:
            choices = [int(c) for c in args.vllm_cores.split(",") if c.strip()]
            setup["vllm_cores"], loaded["vllm"], setup["vllm_warmup_s"] = pick_vllm_cores(
                cfg.rollout, warmup, sampling, choices)
        if "hf" in engines:
            from repic_ray.rollout.hf_engine import HFRolloutEngine

            loaded["hf_generate"] = HFRolloutEngine(cfg.rollout)
            choices = [int(t) for t in args.hf_threads.split(",") if t.strip()]
            setup["hf_threads"] = pick_threads(loaded["hf_generate"], warmup, sampling, choices)
        calls: dict[str, list[dict]] = {name: [] for name in loaded}
        for batch in batches:
            for name, engine in loaded.items():
                calls[name].append(timed_call(engine, batch, sampling))
    finally:
        if "vllm" in loaded:
            close_vllm(loaded["vllm"])
        loaded.clear()
        gc.collect()

    results: dict = {"calls": calls}
    for name, runs in calls.items():
        results[name] = {
            "samples_per_s": spread([r["samples_per_s"] for r in runs]),
            "tokens_per_s_median": spread([r["tokens_per_s"] for r in runs])["median"],
            "mean_completion_tokens": sum(r["mean_completion_tokens"] for r in runs) / len(runs),
            "samples": sum(r["samples"] for r in runs),
        }
    images = [len(r.image_paths) for r in requests]
    setup.update({"model": cfg.rollout.model, "dtype": cfg.rollout.dtype, "prompts": args.prompts,
                  "n": args.n, "max_tokens": args.max_tokens, "temperature": sampling.temperature,
                  "iters": args.iters, "images_per_prompt_mean": sum(images) / len(images),
                  "images_per_prompt_max": max(images)})
    rows = [[name, r["samples_per_s"]["min"], r["samples_per_s"]["median"], r["samples_per_s"]["max"],
             r["tokens_per_s_median"], r["mean_completion_tokens"]]
            for name, r in results.items() if name != "calls"]
    table = markdown_table(["engine", "samples/s min", "median", "max", "tokens/s (median)",
                            "tokens/sample"], rows)
    if "vllm" in calls and "hf_generate" in calls:
        pairs = list(zip(calls["vllm"], calls["hf_generate"]))
        results["speedup_samples_per_s"] = spread([v["samples_per_s"] / h["samples_per_s"] for v, h in pairs])["median"]
        results["speedup_tokens_per_s"] = spread([v["tokens_per_s"] / h["tokens_per_s"] for v, h in pairs])["median"]
        table += (f"\n\nvLLM / HF generate (median of {len(pairs)} pairs): "
                  f"{results['speedup_samples_per_s']:.2f}x samples/s, {results['speedup_tokens_per_s']:.2f}x tokens/s")
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
