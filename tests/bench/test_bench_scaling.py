"""bench/bench_scaling.py end to end, reduced: 1 and 2 rollout workers on the same requests."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_scaling_bench_runs_each_worker_count(run_bench, positive):
    out = run_bench("bench_scaling.py", "--model", "tiny:qwen2.5-vl", "--workers", "1,2", "--prompts", "2",
                    "--n", "2", "--max-tokens", "8", "--iters", "1", "--set", "rollout.kv_cache_gib", "0.25",
                    "--set", "rollout.enforce_eager", "true")
    assert [r["workers"] for r in out["rows"]] == [1, 2]
    for row in out["rows"]:
        positive(row, "samples_per_s", "tokens_per_s", "speedup_vs_first", "efficiency", "startup_seconds")
        assert row["samples"] == 4
    # per-request seeds: the split over workers does not change the work done
    assert out["rows"][0]["completion_tokens"] == out["rows"][1]["completion_tokens"]
    assert out["rows"][0]["speedup_vs_first"] == pytest.approx(1.0)
