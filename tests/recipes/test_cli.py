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
    """The README's main job (`repic train --config configs/tiny_cpu.yaml`), 2 steps, with a
    periodic evaluation after step 1: names and caption quality in the report and the metrics."""
    out = tmp_path / "run"
    res = repic("train", "--config", "configs/tiny_cpu.yaml", "--trainer.steps", "2",
                "--trainer.output_dir", str(out), "--data.eval_max_per_k", "2", "--algo.prompts_per_step", "2",
                "--trainer.eval_every", "1", "--trainer.progress_bar", "false", timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| before |" in report and "| after |" in report
    assert (out / "curves.png").exists() and (out / "eval_curves.png").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "final" / "model" / "model.safetensors").exists()
    # a quiet console: vLLM's per-step INFO lines and library warnings are in the run's log only
    log = (out / "log.txt").read_text()
    assert "Successfully reset prefix cache" in log
    assert "Successfully reset prefix cache" not in res.stdout + res.stderr
    assert "evaluation after:" in res.stderr and "report:" in res.stdout
    # the recipe's reward: names + CIDEr-D caption quality (corpus from the training references)
    assert all("reward/name_mean" in r and "reward/caption/cider_mean" in r for r in rows)
    assert json.loads((out / "reference_corpus.json").read_text())[0]
    # degeneration cannot hide: rollout repetition and drift every step, quality in the periodic eval
    for key in ("response/repeated_4gram_mean", "response/at_cap_frac", "response/length_drift"):
        assert all(0.0 <= r[key] < 100 for r in rows), key
    assert all(-1.0 <= r["response/repeated_4gram_drift"] <= 1.0 for r in rows)
    assert rows[0]["response/length_drift"] == 1.0
    assert {"eval/k3/f1", "eval/quality/pooled/cider_d", "eval/quality/k1/rep4"} <= set(rows[0])
    # report: names beside quality, per-split quality, sample captions of the same images
    evals = json.loads((out / "evals.json").read_text())
    assert list(evals) == ["before", "step_1", "after"]
    # the demo personalizes in context: it is scored on names no training prompt used
    from repic_ray.data.names import name_split

    held_out = set(name_split()[1])
    gt = [n for k in range(1, 6) for row in json.loads(
        (out / "eval" / "after" / f"captions_k{k}.json").read_text()) for n in row[1]]
    assert gt and set(gt) <= held_out
    pooled = evals["after"]["quality"]["pooled"]
    assert set(pooled) == {"cider_d", "bleu4", "meteor", "rouge_l", "rep4", "distinct2", "mean_words", "at_cap"}
    assert pooled["mean_words"] > 5 and 0 <= pooled["cider_d"] <= 10
    assert "## Names and caption quality (pooled)" in report and "| CIDEr-D | CIDEr-D k1 |" in report
    # whether each name sits on its own object: the world's eval samples know the categories
    bound = evals["after"]["binding"]
    assert {"k1", "k3", "k3plus", "pooled"} <= set(bound)
    assert {"eval/binding/k3plus/bound_rate", "eval/binding/pooled/true_descriptions"} <= set(rows[0])
    assert 0 <= bound["k3plus"]["bound"] <= bound["k3plus"]["named"] <= bound["k3plus"]["concepts"]
    assert "| >=3 bound | 1 bound |" in report
    assert "| pooled | after |" in report and "## Caption quality per split" in report
    captions = json.loads((out / "eval" / "after" / "captions_k3.json").read_text())
    assert "## Sample captions (same images)" in report and repr(captions[0][2].strip()) in report
