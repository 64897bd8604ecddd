"""Weight-sync latency: LoRA tensors vs full (merged) weights, as a fraction of the step.

After each learner update the driver publishes the policy (`LearnerGroup.export`: the
learner builds the LoRA tensors, or merges them into full weights, and leaves them in the
object store; the step's `time/sync`) and every rollout worker loads it before its next
generation (`RolloutWorker.sync`: fetch from the object store, write + `add_lora`, or write
+ `reload_weights`, then cache resets). Here the worker load is triggered right after the
step so it can be timed on its own; in a training run it happens at the start of the next
generation. Sync latency = export + publish + slowest worker load; the step time includes
that load. One training run per mode (`cluster.weight_sync` = lora / full), same config
otherwise, `--warmup` steps excluded.

    python bench/bench_weight_sync.py --steps 3 --prompts 8 --group 8 --out bench/results/weight_sync.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Stopwatch,
    bench_config,
    finish,
    markdown_table,
    pipeline_parser,
    ray_session,
    run_pipeline,
    setup_env,
    step_overrides,
)


def payload_bytes(weights) -> int:
    """Size of a published policy version (LoRA tensors or the full state dict)."""
    import ray

    payload = ray.get(weights.ref)
    tensors = payload[0] if weights.kind == "lora" else payload
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def measure(cfg, steps: int, warmup: int) -> dict:
    import ray

    loads: list[float] = []
    size: dict[str, int] = {}

    def load_now(run, metrics) -> None:
        with Stopwatch() as sw:
            versions = ray.get([w.sync.remote(run.weights) for w in run.handles.rollout])
        if set(versions) != {run.version}:
            raise RuntimeError(f"workers serve versions {versions}, expected {run.version}")
        loads.append(sw.seconds)
        metrics["time/worker_load"] = sw.seconds
        if not size:
            size["bytes"] = payload_bytes(run.weights)

    out = run_pipeline(cfg, steps, warmup, after_step=load_now)
    exports = [m["time/sync"] for m in out.pop("step_metrics")]
    sync = [e + w for e, w in zip(exports, loads)]
    return {
        "kind": cfg.cluster.weight_sync,
        "payload_bytes": size["bytes"],
        "export_publish_seconds": sum(exports) / steps,
        "worker_load_seconds": sum(loads) / steps,
        "sync_seconds": sum(sync) / steps,
        "step_seconds": out["seconds_per_step"],
        "sync_fraction_of_step": sum(sync) / out["seconds"],
        "run": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = pipeline_parser(__doc__)
    p.add_argument("--workers", type=int, default=1, help="rollout workers (each loads every version)")
    p.add_argument("--kinds", default="lora,full", help="comma-separated subset of lora,full")
    args = p.parse_args(argv)
    setup_env()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"lora", "full"}:
        raise SystemExit(f"--kinds: expected a subset of lora,full, got {args.kinds!r}")
    common = [*step_overrides(args), "--cluster.num_rollout_workers", str(args.workers)]
    # LoRA sync needs an engine with LoRA enabled; full sync serves merged weights without it.
    cfgs = {k: bench_config(args, [*common, "--cluster.weight_sync", k, "--rollout.enable_lora", str(k == "lora"),
                                   "--trainer.output_dir",
                                   f"/tmp/bench-weight-sync-{os.getpid()}-{k}"], name=f"bench_sync_{k}")
            for k in kinds}
    results = {}
    with ray_session(cfgs[kinds[0]]):
        for k in kinds:
            results[k] = measure(cfgs[k], args.steps, args.warmup)
    cfg = cfgs[kinds[0]]
    setup = {"model": cfg.rollout.model, "prompts_per_step": args.prompts, "group_size": args.group,
             "max_tokens": args.max_tokens, "lora_r": cfg.learner.lora.r, "rollout_workers": args.workers,
             "steps": args.steps, "warmup": args.warmup}
    table = markdown_table(
        ["weights", "MB", "export+publish s", "worker load s", "sync s", "step s", "sync / step"],
        [[k, r["payload_bytes"] / 1e6, r["export_publish_seconds"], r["worker_load_seconds"], r["sync_seconds"],
          r["step_seconds"], r["sync_fraction_of_step"]] for k, r in results.items()],
    )
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
