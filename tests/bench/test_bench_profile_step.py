"""bench/profile_step.py end to end, reduced: the step and its parts, 1 timed step, 2 repeats."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_profile_step_times_the_step_and_its_parts(run_bench, positive):
    out = run_bench("profile_step.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--group", "2",
                    "--max-tokens", "8", "--steps", "1", "--warmup", "1", "--repeats", "2",
                    "--set", "rollout.enforce_eager", "true")
    positive(out["pipeline_step"]["step_seconds"], "median")
    positive(out["pipeline_step"]["phases_median"], "generate", "train")
    for part in ("generate_via_actor", "generate_direct_base", "generate_direct_lora", "generate_direct_merged",
                 "learner_logprobs_via_group", "learner_train_via_group", "learner_export", "worker_load_weights"):
        positive(out[part], "min", "median", "max")
        assert len(out[part]["all"]) == 2
    # Every process's threads are recorded; Ray gives a 1-CPU actor one torch thread, and in
    # sync mode the recipe's learner also takes the rollout worker's core (idle while it trains).
    for role in ("driver", "rollout_worker", "learner", "reward_actor"):
        assert out["processes"][role]["torch_threads"] >= 1
    procs = out["processes"]
    assert (procs["rollout_worker"]["torch_threads"], procs["reward_actor"]["torch_threads"]) == (1, 1)
    assert procs["learner"]["torch_threads"] == min(2, os.cpu_count() or 1)
    assert procs["learner"]["omp_num_threads"] == str(min(2, os.cpu_count() or 1))
