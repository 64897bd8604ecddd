"""bench/bench_async.py end to end, reduced: sync and async runs, 2 timed steps each."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_async_bench_runs_both_modes(run_bench, positive):
    out = run_bench("bench_async.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--group", "2",
                    "--max-tokens", "8", "--steps", "2", "--warmup", "1",
                    "--set", "rollout.enforce_eager", "true")
    for mode in ("sync", "async"):
        positive(out[mode], "seconds", "seconds_per_step", "samples_per_s")
        assert out[mode]["steps"] == 2
    positive(out, "speedup_wall")
    # one-step off-policy: async trains on rollouts one version behind, sync on the newest
    assert out["sync"]["staleness_mean"] == 0
    assert out["async"]["staleness_mean"] == pytest.approx(1.0)
