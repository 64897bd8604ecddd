"""The `repic` command.

    repic train --config configs/tiny_cpu.yaml [--dotted.key VALUE ...] [--address ADDR]
    repic sft   --config configs/sft_tiny.yaml [--dotted.key VALUE ...]
    repic pretrain-vision --config configs/pretrain_vision_tiny.yaml [--dotted.key VALUE ...]
    repic eval  --captions FILE [--mode compat] [--json]
    repic eval  --checkpoint DIR [--adapter DIR] --data WORLD_DIR [--retrieval skip|topk]
    repic serve --checkpoint DIR [--config deploy/serve.yaml]
    repic world --out DIR [--seed N]

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
    args, overrides = parser.parse_known_args(argv)
    if args.address:
        overrides += ["--cluster.address", args.address]
    if args.resume:
        overrides += ["--trainer.resume", "true"]
    return load_config(ExperimentConfig, args.config, overrides)


def cmd_train(argv: list[str]) -> int:
    cfg = _experiment(argv, "repic train")
    if cfg.sft.steps > 0:
        from repic_ray.pipeline.sft import run_sft

        sft_dir = run_sft(cfg)
        cfg.learner.model = str(sft_dir)
        cfg.rollout.model = ""
    from actors.driver import train

    evals = train(cfg)
    print(json.dumps(evals, indent=2))
    print(f"report: {cfg.output_dir}/report.md")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from repic_ray.pipeline.sft import run_sft

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
    from repic_ray.evaluation.cli import main

    return main(argv) or 0


def cmd_serve(argv: list[str]) -> int:
    from deploy.cli import main

    return main(argv) or 0


def cmd_world(argv: list[str]) -> int:
    from repic_ray.data.synthetic import main

    main(argv)
    return 0


COMMANDS = {"train": cmd_train, "sft": cmd_sft, "pretrain-vision": cmd_pretrain_vision, "eval": cmd_eval,
            "serve": cmd_serve, "world": cmd_world}


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
