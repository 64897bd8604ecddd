"""The `repic` command.

    repic train --config configs/tiny_cpu.yaml [--dotted.key VALUE ...] [--address ADDR]
    repic sft   --config configs/sft_tiny.yaml [--dotted.key VALUE ...]
    repic pretrain-vision --config configs/pretrain_vision_tiny.yaml [--dotted.key VALUE ...]
    repic eval  --captions FILE [--mode compat] [--json]
    repic eval  --checkpoint DIR [--adapter DIR] --data WORLD_DIR [--retrieval skip|topk]
    repic serve --checkpoint DIR [--config deploy/serve.yaml]
    repic world --out DIR [--seed N]
    repic config show --config FILE [--dotted.key VALUE ...]
    repic plan  --config X [--nodes 2 --gpus-per-node 8 --gpu-memory-gib 80] [--json]

`train` runs the SFT stage first when `sft.steps > 0`, then RL from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from repic_ray.config import ConfigError, load_config


def _experiment(argv: list[str], prog: str):
    from repic_ray.pipeline.config import ExperimentConfig

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults are used without one")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--verbose", action="store_true",
                        help="library logs (vLLM, Ray, DeepSpeed) on the console too, not only in the run's log.txt")
    args, overrides = parser.parse_known_args(argv)
    if args.address:
        overrides += ["--cluster.address", args.address]
    if args.resume:
        overrides += ["--trainer.resume", "true"]
    if args.verbose:
        overrides += ["--trainer.verbose", "true"]
    return load_config(ExperimentConfig, args.config, overrides)


def cmd_train(argv: list[str]) -> int:
    cfg = _experiment(argv, "repic train")
    from pathlib import Path

    from recipes.console import setup_logging

    setup_logging(Path(cfg.output_dir) / "log.txt", cfg.trainer.verbose)  # before DeepSpeed's import chatter
    if cfg.sft.steps > 0:
        from recipes.sft import run_sft

        sft_dir = run_sft(cfg)
        cfg.learner.model = cfg.rollout.model = str(sft_dir)
    from recipes.train import train

    evals = train(cfg)
    print(json.dumps(evals, indent=2))
    print(f"report: {cfg.output_dir}/report.md")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from recipes.sft import run_sft

    cfg = _experiment(argv, "repic sft")
    if cfg.sft.steps < 1:
        raise ConfigError("sft.steps: must be >= 1 for `repic sft`")
    print(f"SFT checkpoint: {run_sft(cfg)}")
    return 0


def cmd_pretrain_vision(argv: list[str]) -> int:
    from repic_ray.pipeline.pretrain_vision import run_pretrain_vision

    cfg = _experiment(argv, "repic pretrain-vision")
    if cfg.pretrain_vision.steps < 1:
        raise ConfigError("pretrain_vision.steps: must be >= 1 for `repic pretrain-vision`")
    print(f"vision checkpoint: {run_pretrain_vision(cfg)}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from recipes.eval import main

    return main(argv) or 0


def cmd_serve(argv: list[str]) -> int:
    from deploy.cli import main

    return main(argv) or 0


def cmd_world(argv: list[str]) -> int:
    from repic_ray.data.synthetic import main

    main(argv)
    return 0


def cmd_config(argv: list[str]) -> int:
    """`repic config show`: the resolved experiment config (derived fields filled) as YAML."""
    from repic_ray.config import dump_yaml

    if not argv or argv[0] != "show":
        print("usage: repic config show --config FILE [--dotted.key VALUE ...]", file=sys.stderr)
        return 2
    print(dump_yaml(_experiment(argv[1:], "repic config show")), end="")
    return 0


def cmd_plan(argv: list[str]) -> int:
    """`repic plan`: memory per role and placement for a recipe on a cluster, with a verdict."""
    from repic_ray.plan import main

    return main(argv)


COMMANDS = {"config": cmd_config, "train": cmd_train, "sft": cmd_sft,
            "pretrain-vision": cmd_pretrain_vision, "eval": cmd_eval, "serve": cmd_serve,
            "world": cmd_world, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
