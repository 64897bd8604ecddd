"""Shared pieces of the training-side benchmarks: config, prompts, machine facts, output.

Every benchmark measures two (or more) systems side by side in one process, on the same
model, data and machine, prints a markdown table and writes JSON (`--out`). The model is
the shipped SFT checkpoint when it exists (completions of realistic length: it stops at
end-of-sequence), else the tiny random Qwen2.5-VL (`tiny:qwen2.5-vl`, always runs to
`max_tokens`). Prompts are RePIC multi-image prompts (reference images with their names,
then the query) from the synthetic concept world of `configs/tiny_fixed.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECIPE = "configs/tiny_fixed.yaml"
SFT_CHECKPOINT = "checkpoints/tiny-sft"
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "REPIC_CACHE": str(REPO / ".cache" / "repic"),
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    "TOKENIZERS_PARALLELISM": "false",
}


_LOAD_AT_START: list[float] = []


def setup_env() -> None:
    """Offline hub, project caches, a bounded vLLM KV cache on CPU (kept if already set);
    notes the load average at the start of the run."""
    _LOAD_AT_START[:] = list(os.getloadavg())
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.chdir(REPO)  # recipes and the SFT checkpoint are addressed relative to the repo


def default_model() -> str:
    """The SFT checkpoint when it has been trained (it holds a config), else the tiny random model."""
    return SFT_CHECKPOINT if (REPO / SFT_CHECKPOINT / "config.json").exists() else "tiny:qwen2.5-vl"


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """Options every benchmark shares; `--set KEY VALUE` overrides any config field."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: checkpoints/tiny-sft if trained, "
                   "else tiny:qwen2.5-vl)")
    p.add_argument("--config", default=RECIPE, help="experiment recipe the settings start from")
    p.add_argument("--max-tokens", type=int, default=96, help="most completion tokens per sample")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="dotted config override, e.g. --set rollout.kv_cache_gib 0.5 (repeatable)")
    return p


def pipeline_parser(description: str | None, steps: int = 3) -> argparse.ArgumentParser:
    """`base_parser` plus the shape of a timed training run: P prompts x G samples a step,
    `--warmup` untimed steps, then `--steps` timed ones. Three warm-up steps by default:
    vLLM on CPU generated the same batch shape in 0.85-0.95 s in steps 2-3 of a run and
    0.50-0.64 s from step 5 on (one-time warm-up of the engine's kernels on new shapes)."""
    p = base_parser(description)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, P")
    p.add_argument("--group", type=int, default=8, help="generations per prompt, G (RePIC: 8)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (engine warm-up, first update)")
    return p


def step_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides for `pipeline_parser`'s options (validated)."""
    if args.steps < 1 or args.warmup < 0 or args.prompts < 1 or args.group < 1:
        raise SystemExit("--steps, --prompts and --group must be >= 1 and --warmup >= 0")
    # Every completion sampled (no greedy member), as TRL and the HF engine sample them: the
    # systems do the same work (`--set sampling.greedy_member true` measures the recipe's).
    return ["--algo.prompts_per_step", str(args.prompts), "--algo.group_size", str(args.group),
            "--learner.micro_batch_size", str(min(16, args.prompts * args.group)),
            "--sampling.greedy_member", "false"]


def bench_config(args: argparse.Namespace, overrides: Sequence[str] = (), name: str = "bench"):
    """The experiment config of a benchmark: recipe, then `overrides`, then the user's `--set`.

    Derived fields (the rollout checkpoint) are filled as `repic train` fills them."""
    from recipes.train import prepare_config
    from repic_ray.config import load_config
    from repic_ray.pipeline.config import ExperimentConfig

    model = args.model or default_model()
    flat = ["--name", name, "--learner.model", model, "--sampling.max_tokens", str(args.max_tokens),
            "--trainer.progress_bar", "false", "--trainer.tensorboard", "false",
            "--trainer.checkpoint_every", "0", "--trainer.eval_before", "false", *overrides]
    for key, value in args.set:
        flat += [f"--{key}", value]
    return prepare_config(load_config(ExperimentConfig, args.config, flat))


def world_requests(cfg, num_prompts: int, n: int, prefix: str = "bench") -> tuple[list, list]:
    """(requests, samples): the first `num_prompts` training samples of the world as rollout requests.

    Raises `ValueError` when the world holds fewer samples than asked for."""
    from repic_ray.models.loading import load_processor
    from repic_ray.pipeline.episodes import load_run_data, make_request

    data = load_run_data(cfg.data)
    if len(data.train) < num_prompts:
        raise ValueError(f"asked for {num_prompts} prompts, the world has {len(data.train)} training samples")
    samples = data.train[:num_prompts]
    processor = load_processor(cfg.rollout.tokenizer or cfg.rollout.model)
    requests = [make_request(f"{prefix}:{i}", s, processor, cfg.trainer.seed, n)[0] for i, s in enumerate(samples)]
    return requests, samples


def rollout_throughput(results: list, seconds: float) -> dict[str, float]:
    """Samples/s and completion tokens/s of a batch of `RolloutResult`s."""
    completions = [c for r in results for c in r.completions]
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "seconds": seconds,
        "samples": len(completions),
        "completion_tokens": tokens,
        "samples_per_s": len(completions) / seconds,
        "tokens_per_s": tokens / seconds,
        "mean_completion_tokens": tokens / max(len(completions), 1),
    }


def ray_session(cfg):
    """Context manager: a private local Ray cluster for `cfg` (or the one already joined)."""
    import contextlib

    @contextlib.contextmanager
    def session():
        import ray

        from recipes.train import init_ray

        started = init_ray(cfg)
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    return session()


def run_pipeline(cfg, steps: int, warmup: int, after_step=None) -> dict[str, Any]:
    """Start a training run on the joined Ray cluster, take `warmup` untimed then `steps` timed
    `training_step`s, shut the run's actors down. `after_step(run, metrics)` runs inside the timed
    window after each timed step (its time counts). Returns wall seconds, samples/s, per-step
    metrics and the mean seconds per phase."""
    from recipes import train as driver

    run = driver.start_run(cfg)
    try:
        for _ in range(warmup):
            driver.training_step(run)
        timed, step_seconds = [], []
        with Stopwatch() as sw:
            for _ in range(steps):
                t = time.perf_counter()
                metrics = driver.training_step(run)
                if after_step is not None:
                    after_step(run, metrics)
                timed.append(metrics)
                step_seconds.append(time.perf_counter() - t)
        drain = 0.0
        if run.pending is not None:  # async: the rollout launched for a step that will not run
            with Stopwatch() as dw:
                driver.drain_pending(run)
            drain = dw.seconds
    finally:
        driver.shutdown(run)
    P, G = cfg.algo.prompts_per_step, cfg.algo.group_size
    phases = sorted({k[5:] for m in timed for k in m if k.startswith("time/")})
    return {
        "steps": steps,
        "warmup": warmup,
        "seconds": sw.seconds,
        "seconds_per_step": sw.seconds / steps,
        "step_seconds": step_seconds,
        "samples_per_s": steps * P * G / sw.seconds,
        "untimed_drain_seconds": drain,
        "reward_mean": sum(m["reward/total_mean"] for m in timed) / steps,
        "completion_tokens_mean": sum(m["response/length_mean"] for m in timed) / steps,
        "phase_seconds_per_step": {p: sum(m.get(f"time/{p}", 0.0) for m in timed) / steps for p in phases},
        "step_metrics": timed,
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max / n of repeated measurements."""
    import statistics

    if not values:
        raise ValueError("spread of no measurements")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds`"""

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: cores, load, accelerator, library versions."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15_at_start": list(_LOAD_AT_START) or None,
        "load_avg_1_5_15_at_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_main_process": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count(),
    }
    for module in ("vllm", "transformers", "ray", "deepspeed", "trl"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, RuntimeError):  # not installed, or fails to import on this machine
            info[module] = None
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(results: dict[str, Any], table: str, out: str | None, command: Sequence[str] | None = None) -> None:
    """Print the table and write `results` (plus machine facts and the command line) as JSON."""
    results = {**results, "machine": machine_info(), "command": " ".join(command or sys.argv)}
    print(table)
    print(f"\nmachine: {results['machine']['cpu_count']} cores, gpu={results['machine']['gpu']}, "
          f"load avg at start {results['machine']['load_avg_1_5_15_at_start']}, "
          f"at end {results['machine']['load_avg_1_5_15_at_end']}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
