"""bench/bench_weight_sync.py end to end, reduced: LoRA and full-weight sync, 1 timed step each."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_weight_sync_bench_measures_lora_and_full(run_bench, positive):
    out = run_bench("bench_weight_sync.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--group", "2",
                    "--max-tokens", "8", "--steps", "1", "--warmup", "1",
                    "--set", "rollout.enforce_eager", "true")
    for kind in ("lora", "full"):
        positive(out[kind], "payload_bytes", "export_publish_seconds", "worker_load_seconds", "sync_seconds",
                 "step_seconds", "sync_fraction_of_step")
        assert out[kind]["sync_fraction_of_step"] < 1
    # LoRA tensors are a fraction of the full weights
    assert out["lora"]["payload_bytes"] < out["full"]["payload_bytes"]
