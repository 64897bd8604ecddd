"""bench/bench_rl_step.py end to end, reduced: our pipeline and TRL's GRPOTrainer, 1 + 1 steps."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_rl_step_bench_measures_ours_and_trl(run_bench, positive):
    out = run_bench("bench_rl_step.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--group", "4",
                    "--max-tokens", "8", "--steps", "1", "--warmup", "1")
    for system in ("ours", "trl"):
        positive(out[system], "seconds_per_step", "samples_per_s", "completion_tokens_mean")
        assert out[system]["steps"] == 1
    positive(out["ours"]["phase_seconds_per_step"], "generate", "reward", "train", "sync")
    assert out["trl"]["settings"]["loss_type"] == "grpo" and out["trl"]["settings"]["num_generations"] == 4
    assert out["trl"]["settings"]["beta"] == pytest.approx(0.04)
    positive(out, "speedup_samples_per_s")
