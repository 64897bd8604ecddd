"""RL step throughput: our Ray pipeline vs TRL's `GRPOTrainer`, RePIC's recipe, same model.

Ours: `recipes.train` (vLLM rollout worker, reward actor, DeepSpeed learner as Ray actors),
`training_step` timed wall clock, per phase as well. TRL: `bench/trl_grpo.py` (same
LoRA, beta, clip, group size, per-sequence loss aggregation, learning rate, prompts and
name reward; generation with transformers). Both train P prompts x G generations per step;
`--warmup` steps are excluded, then `--steps` are timed, in `--rounds` rounds that
alternate the systems (ours, TRL, ours, TRL, ...). The two run one after the other (Ray is
shut down before TRL starts), never competing for the CPU. TRL trains on the prompts our
sampler draws, in the same order, with gradient checkpointing as our learner has it.
Reported: min / median / max seconds per step over all timed steps, and the median over
rounds of the per-round speed ratio.

    python bench/bench_rl_step.py --prompts 4 --group 8 --max-tokens 96 --steps 5 --rounds 2 \
        --out bench/results/rl_step.json
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
    spread,
    step_overrides,
)


def learner_threads(cfg) -> int:
    """The learner's torch threads as `make_learners` sets them."""
    from actors.roles import role_threads
    from recipes.train import learner_resources

    return role_threads(learner_resources(cfg))


def run_ours(cfg, steps: int, warmup: int) -> dict:
    """`warmup + steps` driver steps on a private Ray cluster; the last `steps` timed."""
    with ray_session(cfg):
        out = run_pipeline(cfg, steps, warmup)
    del out["step_metrics"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = pipeline_parser(__doc__, steps=5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (RePIC: 0.04)")
    p.add_argument("--systems", default="ours,ours_async,trl",
                   help="comma-separated subset of ours (the recipe: sync, on-policy), ours_async "
                        "(the same with --algo.mode async: generation of step n+1 overlaps step n's "
                        "update, one step off-policy) and trl")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (ours, then TRL), alternating A B A B; each round starts both "
                        "systems afresh, takes --warmup untimed and --steps timed steps")
    p.add_argument("--trl-threads", type=int, default=None,
                   help="torch threads of the TRL process (default: all cores)")
    args = p.parse_args(argv)
    setup_env()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - {"ours", "ours_async", "trl"}:
        raise SystemExit(f"--systems: expected a subset of ours,ours_async,trl, got {args.systems!r}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    overrides = [
        *step_overrides(args), "--learner.loss.kl_beta", str(args.beta),
        "--trainer.output_dir", str(Path("/tmp") / f"bench-rl-step-{__import__('os').getpid()}"),
        "--reward.verifiable_weight", "0", "--reward.name_weight", "1",
    ]
    cfg = bench_config(args, overrides, name="bench_rl_step")
    cfg_async = bench_config(args, [*overrides, "--algo.mode", "async"], name="bench_rl_step")

    rounds: list[dict] = []
    for r in range(args.rounds):
        this: dict = {}
        for name, c in (("ours", cfg), ("ours_async", cfg_async)):
            if name in systems:
                this[name] = run_ours(c, args.steps, args.warmup)
                print(f"round {r} {name}:", json.dumps(this[name]), flush=True)  # kept should TRL fail
        if "trl" in systems:
            from bench.trl_grpo import run_trl, sampler_order
            from repic_ray.pipeline.episodes import load_run_data

            data = load_run_data(cfg.data)
            # The prompts our driver draws in the same steps, in the same order.
            samples = sampler_order(data.train, cfg.trainer.seed, args.prompts, args.warmup + args.steps)
            this["trl"] = run_trl(cfg, samples, data.categories, args.steps, args.warmup,
                                  threads=args.trl_threads)
            print(f"round {r} trl:", json.dumps(this["trl"]), flush=True)
        rounds.append(this)

    results: dict = {"rounds": rounds}
    P, G = args.prompts, args.group
    for name in systems:
        per_step = [t for rnd in rounds for t in rnd[name]["step_seconds"]]
        results[name] = {
            "step_seconds": spread(per_step),
            "samples_per_s_median": P * G / spread(per_step)["median"],
            "completion_tokens_mean": sum(rnd[name]["completion_tokens_mean"] for rnd in rounds) / len(rounds),
            "reward_mean": sum(rnd[name]["reward_mean"] for rnd in rounds) / len(rounds),
            "phase_seconds_per_step": {
                k: sum(rnd[name]["phase_seconds_per_step"][k] for rnd in rounds) / len(rounds)
                for k in rounds[0][name]["phase_seconds_per_step"]},
        }
    setup = {"model": cfg.rollout.model, "prompts_per_step": P, "group_size": G,
             "max_tokens": args.max_tokens, "beta": args.beta, "lora_r": cfg.learner.lora.r,
             "lr": cfg.learner.lr, "micro_batch_size": cfg.learner.micro_batch_size,
             "gradient_checkpointing": cfg.learner.gradient_checkpointing,
             "loss_agg": cfg.learner.loss.loss_agg, "steps": args.steps, "warmup": args.warmup,
             "rounds": args.rounds, "modes": {"ours": cfg.algo.mode, "ours_async": "async"}, "threads": {
                 "ours": f"learner {learner_threads(cfg)} torch thread(s) "
                         "(cluster.sync_learner_takes_rollout_cpus: the rollout worker's core too, idle "
                         "while it trains), rollout worker and reward actor 1; the vLLM engine is bound "
                         "to its worker's core",
                 "ours_async": f"learner {learner_threads(cfg_async)} torch thread(s), rollout worker and "
                               "reward actor 1; the vLLM engine is bound to its worker's core",
                 "trl": rounds[0]["trl"]["torch_threads"] if "trl" in systems else None}}
    rows = [[name, r["step_seconds"]["min"], r["step_seconds"]["median"], r["step_seconds"]["max"],
             r["samples_per_s_median"], r["completion_tokens_mean"], r["reward_mean"]]
            for name, r in results.items() if name != "rounds"]
    table = markdown_table(["system", "s/step min", "median", "max", "samples/s (median step)",
                            "tokens/sample", "reward mean"], rows)
    for name in systems:
        phases = results[name]["phase_seconds_per_step"]
        table += f"\n\n{name}, s/step per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    for name, suffix in (("ours", ""), ("ours_async", "_async")):
        if name in results and "trl" in results:
            # Per round: TRL's median step / ours (per-sample speed, same P x G); then the median.
            ratios = [spread(rnd["trl"]["step_seconds"])["median"] / spread(rnd[name]["step_seconds"])["median"]
                      for rnd in rounds]
            results[f"speedup_per_round{suffix}"] = ratios
            results[f"speedup_samples_per_s{suffix}"] = spread(ratios)["median"]
            table += (f"\n\n{name} / TRL, samples/s: median over rounds "
                      f"{results[f'speedup_samples_per_s{suffix}']:.2f}x "
                      f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    finish({"setup": setup, **results}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
