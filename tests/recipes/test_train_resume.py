"""`repic train` killed with SIGKILL while it saves a checkpoint and continued with
`repic train --resume` in a new process ends with the metrics of an uninterrupted run:
rollout rewards (before the update) and the learner's loss, KL and grad norm (after it).
The uninterrupted run goes on alongside, untouched by the other run's kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
ARGS = ["train", "--config", "configs/tiny_cpu.yaml", "--trainer.steps", str(STEPS),
        "--trainer.checkpoint_every", "1", "--trainer.eval_before", "false",
        "--data.eval_max_per_k", "1", "--algo.prompts_per_step", "2",
        "--trainer.progress_bar", "false", "--trainer.tensorboard", "false"]


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Wall-clock timings differ between runs; everything else must not.
    return [{k: v for k, v in r.items()
             if not k.startswith(("time/", "perf/")) and not k.endswith(("_s", "_per_s"))}
            for r in rows]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6), (ra["step"], k, va, vb)
            else:
                assert va == vb, (ra["step"], k)


@pytest.fixture(scope="module")
def train(child_env):
    def start(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "recipes.cli", *ARGS,
                                 "--trainer.output_dir", str(out), *extra], cwd=REPO,
                                env=child_env(HF_HUB_OFFLINE="1"), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=(out.parent / f"{out.name}.log").open("w"))

    return start


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_when(proc: subprocess.Popen, ready, timeout: float = 1200) -> None:
    """SIGKILL the run's process group (driver, Ray) once `ready()`; then every process the
    run had started (Ray's workers in their own groups, vLLM's engine core under the rollout
    worker) must end too."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = psutil.Process(proc.pid).children(recursive=True)
    assert "VLLM::EngineCore" in {_name(p) for p in started}, {_name(p) for p in started}
    alive = kill_run(proc, started)
    assert not alive, f"processes outlived the killed run: {alive}"


def kill_run(proc: subprocess.Popen, started: list[psutil.Process] | None = None) -> list:
    """SIGKILL the run's process group, wait for `started` (default: the run's processes
    now) to end, kill any that outlive it and return those as (process, name)."""
    if started is None:
        started = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(started, timeout=60)
    alive = [(p, _name(p)) for p in alive if _live(p)]
    for p, _ in alive:
        p.kill()
    return alive


@pytest.mark.slow
def test_killed_train_resumes_to_the_same_metrics(tmp_path, train):
    # The uninterrupted run, alongside in its own process and Ray cluster, as two users'
    # runs on one machine are.
    whole = train(tmp_path / "whole")
    try:
        out = tmp_path / "run"
        ckpts = out / "checkpoints"
        # 1. Killed mid-save: step 1 sealed, a later checkpoint's temporary folder exists.
        proc = train(out)
        kill_when(proc, lambda: (ckpts / "step_000001" / "manifest.json").exists()
                  and any(ckpts.glob("step_*.tmp")))
        # 2. Resumed in a new process (the leftover is removed), to the end.
        resumed = train(out, "--resume")
        assert resumed.wait(timeout=1500) == 0, (tmp_path / "run.log").read_text()[-3000:]
        assert not list(ckpts.glob("*.tmp"))
        resumed_metrics = metrics(out)
        assert {"reward/total_mean", "train/loss", "train/kl", "train/grad_norm"} <= resumed_metrics[-1].keys()
        assert whole.wait(timeout=1500) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        if whole.poll() is None:  # a failure above must not leave the reference run going
            kill_run(whole)
    assert_same(resumed_metrics, metrics(tmp_path / "whole"))
