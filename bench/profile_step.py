"""Where a pipeline step's time goes: the step against its parts measured standalone.

One training run of the embedded recipe on a private local Ray cluster. After `--warmup`
steps (the LoRA adapter exists), `--steps` timed `training_step`s give the pipeline's
phase times. Then, for one batch of the same shape (P prompts x G samples, fresh prompts
every call, the engines' caches reset before each call):

- generate through the rollout worker actor (the policy of the last step, as the run
  publishes it: LoRA tensors or merged weights, `cluster.weight_sync`), as the driver
  calls it;
- generate with a vLLM engine built in this process from the same config (LoRA enabled):
  with the base weights, with the last step's LoRA adapter, and with that adapter merged
  into full weights (what `cluster.weight_sync: full` serves);
- the learner update through `LearnerGroup` (the actor), and the actor's own
  `compute_logprobs` (the experience phase's pass, when the run makes one);
- publishing a new policy version (the learner's export) and the rollout worker loading
  it (fetch, write, `add_lora` or `reload_weights`, cache resets): the weight sync;
- the torch thread count and CPU affinity of every actor process.

Each part is repeated `--repeats` times (min / median / max). The gap between a phase in
the step and its standalone part is overhead of the pipeline (object store, scheduling,
request building); the gap between adapter and base generation is vLLM's LoRA path.

    python bench/profile_step.py --prompts 4 --group 8 --max-tokens 96 --steps 5 --repeats 5 \
        --out bench/results/profile_step.json
"""

from __future__ import annotations

import dataclasses
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
    setup_env,
    spread,
    step_overrides,
)


def process_facts() -> dict:
    """Torch threads and CPU affinity of the calling process (run inside each actor)."""
    import torch

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "vllm_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}


def timed(fn, repeats: int, before=None) -> dict:
    """`fn(i)` timed `repeats` times; `before()` (cache resets) runs before each, off the clock."""
    times = []
    for i in range(repeats):
        if before is not None:
            before()
        with Stopwatch() as sw:
            fn(i)
        times.append(sw.seconds)
    return {**spread(times), "all": times}


def main(argv: list[str] | None = None) -> int:
    p = pipeline_parser(__doc__, steps=5)
    p.add_argument("--repeats", type=int, default=5, help="repetitions of each standalone part")
    args = p.parse_args(argv)
    setup_env()
    import ray

    from recipes import train as driver
    from repic_ray.pipeline.episodes import make_request
    from repic_ray.pipeline.experience import rollout_batch
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    cfg = bench_config(args, [*step_overrides(args), "--trainer.output_dir",
                              str(Path("/tmp") / f"bench-profile-{os.getpid()}")], name="bench_profile")
    P, G = args.prompts, args.group
    results: dict = {}
    with ray_session(cfg):
        run = driver.start_run(cfg)
        try:
            for _ in range(args.warmup):
                driver.training_step(run)
            steps = []
            for _ in range(args.steps):
                with Stopwatch() as sw:
                    m = driver.training_step(run)
                steps.append({"seconds": sw.seconds, **{k[5:]: v for k, v in m.items() if k.startswith("time/")},
                              "worker_generate": m["rollout/worker_generate_s"]})
            results["pipeline_step"] = {
                "step_seconds": spread([s["seconds"] for s in steps]),
                "phases_median": {k: spread([s[k] for s in steps])["median"] for k in steps[0]
                                  if k not in ("seconds", "worker_generate")},
                # of the generate phase, the time inside the worker's engine.generate (the
                # rest: weight load, request transfer, results back)
                "worker_generate_median": spread([s["worker_generate"] for s in steps])["median"],
            }
            facts = {"driver": process_facts()}
            worker, learners = run.handles.rollout[0], run.handles.learners
            facts["rollout_worker"] = ray.get(worker.__ray_call__.remote(lambda self: process_facts()))
            facts["learner"] = ray.get(learners.actors[0].__ray_call__.remote(lambda self: process_facts()))
            facts["reward_actor"] = ray.get(run.handles.rewards[0].__ray_call__.remote(lambda self: process_facts()))
            results["processes"] = facts

            # Fresh prompts for every call: the sampler's next items (not trained on here).
            batches = []
            for i in range(args.repeats):
                items = run.sampler.next(P)
                batches.append([make_request(f"profile{i}:{uid}", s, run.processor, cfg.trainer.seed, G)[0]
                                for uid, s in items])

            def reset_worker() -> None:
                ray.get(worker.__ray_call__.remote(
                    lambda self: (self.engine.llm.reset_prefix_cache(),
                                  self.engine.llm.llm_engine.reset_encoder_cache())))

            def actor_generate(i: int) -> None:
                ray.get(worker.generate.remote(batches[i], cfg.sampling, run.weights))

            # The last step's weights loaded first (timed below as the weight sync), caches
            # reset outside the clock: run reset, then time.
            ray.get(worker.sync.remote(run.weights))
            results["generate_via_actor"] = timed(actor_generate, args.repeats, before=reset_worker)

            # The same batches through the learner: update via the group, and its log-prob pass.
            rollouts = [ray.get(worker.generate.remote(b, cfg.sampling, run.weights)) for b in batches]
            train_batches = []
            for b, res in zip(batches, rollouts):
                by_uid = {r.uid: r for r in res}
                tb = rollout_batch([(req, c) for req in b for c in by_uid[req.uid].completions])
                tb.advantages_BT = tb.mask_BT.float() * 0.1
                tb.returns_BT = None
                train_batches.append(tb)
            results["learner_logprobs_via_group"] = timed(
                lambda i: learners.compute_logprobs(train_batches[i]), args.repeats)
            results["learner_train_via_group"] = timed(
                lambda i: learners.train_step(train_batches[i]), args.repeats)
            # Weight sync: the learner publishes a new version, the worker loads it.
            kind = cfg.cluster.weight_sync
            export_times, load_times = [], []
            for i in range(args.repeats):
                with Stopwatch() as sw:
                    weights = learners.export(kind, run.version + 1 + i)
                    ray.wait([weights.ref])
                export_times.append(sw.seconds)
                with Stopwatch() as sw:
                    ray.get(worker.sync.remote(weights))
                load_times.append(sw.seconds)
            results["learner_export"] = {**spread(export_times), "all": export_times}
            results["worker_load_weights"] = {**spread(load_times), "all": load_times}
            lora_payload = ray.get(learners.export("lora", 0).ref) if cfg.learner.lora.enabled else None
            full_payload = ray.get(learners.export("full", 0).ref)
        finally:
            driver.shutdown(run)

    # Standalone engine in this process (the actors are gone): base weights, the adapter,
    # the adapter merged into full weights. LoRA enabled, so one engine serves all three.
    rollout_cfg = dataclasses.replace(cfg.rollout, enable_lora=True)
    engine = VLLMRolloutEngine(rollout_cfg)
    try:
        def direct(i: int) -> None:
            engine.generate(batches[i], cfg.sampling)

        def reset() -> None:
            engine.llm.reset_prefix_cache()
            engine.llm.llm_engine.reset_encoder_cache()

        variants = [("generate_direct_base", None)]
        if lora_payload is not None:
            variants.append(("generate_direct_lora", lambda: engine.update_lora(*lora_payload, version=1)))
        variants.append(("generate_direct_merged", lambda: engine.update_full(full_payload, version=2)))
        for name, load in variants:
            if load is not None:
                load()
            engine.generate(batches[0][:1], cfg.sampling)  # warm-up
            results[name] = timed(direct, args.repeats, before=reset)
        results["processes"]["direct_engine_driver"] = process_facts()
    finally:
        engine.close()
        engine.llm.llm_engine.engine_core.shutdown()

    phases = results["pipeline_step"]["phases_median"]
    rows = [["pipeline step (whole)", results["pipeline_step"]["step_seconds"]["median"], ""]]
    rows += [[f"  phase {k}", v, ""] for k, v in phases.items()]
    rows.append(["    of generate: the worker's engine.generate",
                 results["pipeline_step"]["worker_generate_median"], ""])
    for key, label in (("generate_via_actor", f"generate, rollout actor ({cfg.cluster.weight_sync} sync)"),
                       ("generate_direct_base", "generate, engine in-process, base weights"),
                       ("generate_direct_lora", "generate, engine in-process, adapter"),
                       ("generate_direct_merged", "generate, engine in-process, merged weights"),
                       ("learner_logprobs_via_group", "learner log-prob pass, via group"),
                       ("learner_train_via_group", "learner update, via group"),
                       ("learner_export", "learner export + publish"),
                       ("worker_load_weights", "rollout worker loads the new version")):
        if key not in results:
            continue
        r = results[key]
        rows.append([label, r["median"], f"{r['min']:.2f}-{r['max']:.2f}"])
    table = markdown_table(["part", "median s", "min-max s"], rows)
    setup = {"model": cfg.rollout.model, "prompts": P, "group": G, "max_tokens": args.max_tokens,
             "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
             "weight_sync": cfg.cluster.weight_sync, "rollout_enable_lora": cfg.rollout.enable_lora,
             "mode": cfg.algo.mode}
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
