"""bench/bench_serving.py end to end, reduced: Serve + vLLM and the batched HF server, 1 round."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_serving_bench_loads_both_servers(run_bench, positive):
    out = run_bench("bench_serving.py", "--checkpoint", "tiny:qwen2.5-vl", "--concurrency", "2",
                    "--requests", "4", "--rounds", "1", "--max-new-tokens", "8")
    for system in ("ray_serve_vllm", "fastapi_hf_batched"):
        assert out[system]["errors"] == 0 and out[system]["requests"] == 4
        positive(out[system]["throughput_rps"], "min", "median", "max")
        positive(out[system], "completion_tokens_per_request")
    assert out["fastapi_hf_batched"]["batching"]["batches"] >= 1
    positive(out, "throughput_ratio_median", "p99_ratio_median")
