"""The `repic` command as a user runs it (subprocesses, like cleanrl's script tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def repic(child_env):
    """`repic(*args)` runs the command line in a fresh process."""

    def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "recipes.cli", *args], check=False, cwd=REPO,
                              env=child_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                              timeout=timeout)

    return run


def test_bad_config_is_a_clear_error(tmp_path, repic):
    out = repic("train", "--config", "configs/tiny_cpu.yaml", "--algo.group_sise", "4")
    assert out.returncode == 2
    assert "unknown key 'algo.group_sise'" in out.stderr and "algo.group_size" in out.stderr
    missing = repic("sft", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


@pytest.mark.slow
def test_shipped_sft_command_still_runs_shortened(tmp_path, repic):
    """`repic sft --config configs/sft_tiny.yaml` made checkpoints/tiny-sft; 2 steps of it still run."""
    out_dir = tmp_path / "sft"
    res = repic("sft", "--config", "configs/sft_tiny.yaml", "--sft.steps", "2", "--sft.batch_size", "4",
                "--sft.log_every", "1", "--sft.output", str(out_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_main_job_runs_end_to_end_shortened(tmp_path, repic):
    """The README's main job (`repic train --config configs/tiny_cpu.yaml`), 2 steps."""
    out = tmp_path / "run"
    res = repic("train", "--config", "configs/tiny_cpu.yaml", "--trainer.steps", "2",
                "--trainer.output_dir", str(out), "--data.eval_max_per_k", "2", "--algo.prompts_per_step", "2",
                "--trainer.progress_bar", "false", timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| before |" in report and "| after |" in report
    assert (out / "curves.png").exists() and (out / "eval_curves.png").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "final" / "model" / "model.safetensors").exists()
    # a quiet console: vLLM's per-step INFO lines and library warnings are in the run's log only
    log = (out / "log.txt").read_text()
    assert "Successfully reset prefix cache" in log
    assert "Successfully reset prefix cache" not in res.stdout + res.stderr
    assert "evaluation after:" in res.stderr and "report:" in res.stdout
