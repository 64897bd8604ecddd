"""Async (one-step off-policy) vs sync pipeline: wall time for the same number of steps.

`algo.mode sync`: each step generates with the newest weights, then scores, trains and
publishes (RePIC). `algo.mode async`: step t+1's rollouts are launched before step t
trains, so generation overlaps the update (the ratio then uses rollout-time log-probs and
the staleness is logged). Same config otherwise; each mode is its own run on one Ray
cluster, `--warmup` steps excluded, `--steps` timed. The async run's last launched
rollout (for a step that never runs) is drained outside the timed window.

The overlap needs somewhere to run: rollout workers and learners on separate devices (or
cores). On a machine with fewer cores than busy actors they take turns and the gain
shrinks or vanishes.

    python bench/bench_async.py --steps 10 --prompts 8 --group 8 --out bench/results/async.json
"""

from __future__ import annotations

import os
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


def main(argv: list[str] | None = None) -> int:
    args = pipeline_parser(__doc__, steps=10).parse_args(argv)
    setup_env()
    common = step_overrides(args)
    cfgs = {m: bench_config(args, [*common, "--algo.mode", m, "--trainer.output_dir",
                                   f"/tmp/bench-async-{os.getpid()}-{m}"], name=f"bench_{m}")
            for m in ("sync", "async")}
    results = {}
    with ray_session(cfgs["sync"]):
        for mode, cfg in cfgs.items():
            out = run_pipeline(cfg, args.steps, args.warmup)
            metrics = out.pop("step_metrics")
            out["staleness_mean"] = sum(m["rollout/staleness"] for m in metrics) / len(metrics)
            results[mode] = out
    results["speedup_wall"] = results["sync"]["seconds"] / results["async"]["seconds"]
    cfg = cfgs["sync"]
    setup = {"model": cfg.rollout.model, "prompts_per_step": args.prompts, "group_size": args.group,
             "max_tokens": args.max_tokens, "steps": args.steps, "warmup": args.warmup,
             "rollout_workers": cfg.cluster.num_rollout_workers, "learners": cfg.cluster.num_learners}
    rows = []
    for mode in ("sync", "async"):
        r = results[mode]
        ph = r["phase_seconds_per_step"]
        rows.append([mode, r["seconds"], r["seconds_per_step"], r["samples_per_s"], ph.get("generate", 0.0),
                     ph.get("train", 0.0), r["staleness_mean"]])
    table = markdown_table(["mode", "wall s", "s/step", "samples/s", "generate wait s/step", "train s/step",
                            "staleness"], rows)
    table += f"\n\nsync / async wall time: {results['speedup_wall']:.2f}x"
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
