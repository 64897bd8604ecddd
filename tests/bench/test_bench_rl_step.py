"""bench/bench_rl_step.py end to end, reduced: our pipeline (sync and async) and TRL's GRPOTrainer, 1 + 1 steps."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_rl_step_bench_measures_ours_and_trl(run_bench, positive):
    out = run_bench("bench_rl_step.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--group", "4",
                    "--max-tokens", "8", "--steps", "1", "--warmup", "1", "--rounds", "1",
                    "--set", "rollout.enforce_eager", "true")
    for system in ("ours", "ours_async", "trl"):
        positive(out[system]["step_seconds"], "min", "median", "max")
        positive(out[system], "samples_per_s_median", "completion_tokens_mean")
        assert len(out["rounds"][0][system]["step_seconds"]) == 1
    positive(out["ours"]["phase_seconds_per_step"], "generate", "reward", "train", "sync")
    positive(out["trl"]["phase_seconds_per_step"], "generate_and_score", "loss_forward")
    settings = out["rounds"][0]["trl"]["settings"]
    assert settings["loss_type"] == "grpo" and settings["num_generations"] == 4
    assert settings["beta"] == pytest.approx(0.04)
    # Fair set-up: checkpointing as ours (off in the tiny recipe), our prompt order, threads recorded.
    assert settings["gradient_checkpointing"] is False and settings["shuffle_dataset"] is False
    assert out["setup"]["threads"]["trl"] >= 1
    positive(out, "speedup_samples_per_s", "speedup_samples_per_s_async")
    assert out["setup"]["modes"] == {"ours": "sync", "ours_async": "async"}
    assert out["machine"]["load_avg_1_5_15_at_start"] and out["machine"]["load_avg_1_5_15_at_end"]
