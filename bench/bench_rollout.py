"""Rollout throughput: our vLLM engine vs the transformers `generate` engine, same prompts.

Both engines (`repic_ray.rollout.VLLMRolloutEngine`, `HFRolloutEngine`) get the same RePIC
multi-image prompts from the synthetic world, the same sampling settings (n samples per
prompt, temperature, top_p, max_tokens, seed, vision tokens blocked) and the same model in
the same dtype. Each runs one warm-up batch (excluded), then `--iters` timed batches of all
prompts; the engines run one after the other, never competing for the CPU. Reported:
samples/s and completion tokens/s (tokens actually generated: completions stop at
end-of-sequence, so lengths differ between engines and runs).

    python bench/bench_rollout.py --prompts 16 --n 8 --max-tokens 96 --out bench/results/rollout.json
"""

from __future__ import annotations

import gc
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


def measure(engine, requests: list, sampling, iters: int, warmup: list) -> dict:
    """One warm-up call, then `iters` timed calls over all requests (throughput pooled)."""
    engine.generate(warmup, sampling)
    results, seconds = [], 0.0
    for _ in range(iters):
        with Stopwatch() as sw:
            out = engine.generate(requests, sampling)
        results += out
        seconds += sw.seconds
    return rollout_throughput(results, seconds)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (RePIC: 8)")
    p.add_argument("--iters", type=int, default=2, help="timed batches per engine")
    p.add_argument("--engines", default="vllm,hf", help="comma-separated subset of vllm,hf")
    args = p.parse_args(argv)
    setup_env()
    from repic_ray.rollout.config import SamplingConfig

    cfg = bench_config(args, ["--algo.group_size", str(args.n)])
    sampling = SamplingConfig(n=args.n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                              max_tokens=args.max_tokens, seed=0)
    requests, _ = world_requests(cfg, args.prompts, args.n)
    warmup = [r.__class__(uid=f"warmup:{i}", prompt_text=r.prompt_text, image_paths=r.image_paths, n=r.n)
              for i, r in enumerate(requests[:2])]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"vllm", "hf"}
    if unknown or not engines:
        raise SystemExit(f"--engines: expected a subset of vllm,hf, got {args.engines!r}")

    results: dict = {}
    for name in engines:
        if name == "vllm":
            from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

            engine = VLLMRolloutEngine(cfg.rollout)
            try:
                results["vllm"] = measure(engine, requests, sampling, args.iters, warmup)
            finally:
                engine.close()
                engine.llm.llm_engine.engine_core.shutdown()
        else:
            from repic_ray.rollout.hf_engine import HFRolloutEngine

            engine = HFRolloutEngine(cfg.rollout)
            results["hf_generate"] = measure(engine, requests, sampling, args.iters, warmup)
        del engine
        gc.collect()

    images = [len(r.image_paths) for r in requests]
    setup = {"model": cfg.rollout.model, "dtype": cfg.rollout.dtype, "prompts": args.prompts, "n": args.n,
             "max_tokens": args.max_tokens, "temperature": sampling.temperature, "iters": args.iters,
             "images_per_prompt_mean": sum(images) / len(images), "images_per_prompt_max": max(images)}
    rows = [[name, r["samples_per_s"], r["tokens_per_s"], r["mean_completion_tokens"], r["seconds"]]
            for name, r in results.items()]
    if "vllm" in results and "hf_generate" in results:
        results["speedup_samples_per_s"] = results["vllm"]["samples_per_s"] / results["hf_generate"]["samples_per_s"]
        results["speedup_tokens_per_s"] = results["vllm"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
    table = markdown_table(["engine", "samples/s", "tokens/s", "tokens/sample", "timed s"], rows)
    if "speedup_tokens_per_s" in results:
        table += (f"\n\nvLLM / HF generate: {results['speedup_samples_per_s']:.2f}x samples/s, "
                  f"{results['speedup_tokens_per_s']:.2f}x tokens/s")
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
