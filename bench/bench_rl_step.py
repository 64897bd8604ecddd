"""RL step throughput: our Ray pipeline vs TRL's `GRPOTrainer`, RePIC's recipe, same model.

Ours: `recipes.train` (vLLM rollout worker, reward actor, DeepSpeed learner as Ray actors),
`training_step` timed wall clock, per phase as well. TRL: `bench/trl_grpo.py` (same
LoRA, beta, clip, group size, per-sequence loss aggregation, learning rate, prompts and
name reward; generation with transformers). Both train P prompts x G generations per step;
`--warmup` steps are excluded, then `--steps` are timed. The two run one after the other
(Ray is shut down before TRL starts), never competing for the CPU.

    python bench/bench_rl_step.py --prompts 8 --group 8 --steps 3 --max-tokens 96 --out bench/results/rl_step.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    bench_config,
    finish,
    markdown_table,
    pipeline_parser,
    ray_session,
    run_pipeline,
    setup_env,
    step_overrides,
)


def run_ours(cfg, steps: int, warmup: int) -> dict:
    """`warmup + steps` driver steps on a private Ray cluster; the last `steps` timed."""
    with ray_session(cfg):
        out = run_pipeline(cfg, steps, warmup)
    del out["step_metrics"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = pipeline_parser(__doc__)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (RePIC: 0.04)")
    p.add_argument("--systems", default="ours,trl", help="comma-separated subset of ours,trl")
    args = p.parse_args(argv)
    setup_env()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - {"ours", "trl"}:
        raise SystemExit(f"--systems: expected a subset of ours,trl, got {args.systems!r}")
    cfg = bench_config(args, [
        *step_overrides(args), "--learner.loss.kl_beta", str(args.beta),
        "--trainer.output_dir", str(Path("/tmp") / f"bench-rl-step-{__import__('os').getpid()}"),
        "--reward.verifiable_weight", "0", "--reward.name_weight", "1",
    ], name="bench_rl_step")

    results: dict = {}
    if "ours" in systems:
        results["ours"] = run_ours(cfg, args.steps, args.warmup)
        print("ours:", json.dumps(results["ours"]), flush=True)  # kept should the TRL run fail
    if "trl" in systems:
        from bench.trl_grpo import run_trl
        from repic_ray.pipeline.episodes import load_run_data

        data = load_run_data(cfg.data)
        need = (args.warmup + args.steps) * args.prompts
        if len(data.train) < need:
            raise SystemExit(f"the world has {len(data.train)} training samples, TRL needs {need}")
        results["trl"] = run_trl(cfg, data.train[:need], data.categories, args.steps, args.warmup)

    setup = {"model": cfg.rollout.model, "prompts_per_step": args.prompts, "group_size": args.group,
             "max_tokens": args.max_tokens, "beta": args.beta, "lora_r": cfg.learner.lora.r,
             "lr": cfg.learner.lr, "micro_batch_size": cfg.learner.micro_batch_size,
             "loss_agg": cfg.learner.loss.loss_agg, "steps": args.steps, "warmup": args.warmup}
    rows = [[name, r["seconds_per_step"], r["samples_per_s"], r["completion_tokens_mean"], r["reward_mean"]]
            for name, r in results.items()]
    table = markdown_table(["system", "s/step", "samples/s", "tokens/sample", "reward mean"], rows)
    if "ours" in results:
        phases = results["ours"]["phase_seconds_per_step"]
        table += "\n\nours, s/step per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    if "ours" in results and "trl" in results:
        results["speedup_samples_per_s"] = results["ours"]["samples_per_s"] / results["trl"]["samples_per_s"]
        table += f"\n\nours / TRL: {results['speedup_samples_per_s']:.2f}x samples/s"
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
