"""bench/bench_rollout.py end to end, reduced: vLLM and HF generate engines, 2 prompts x 2 samples."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_rollout_bench_measures_both_engines(run_bench, positive):
    out = run_bench("bench_rollout.py", "--model", "tiny:qwen2.5-vl", "--prompts", "2", "--n", "2",
                    "--max-tokens", "8", "--iters", "2")
    for engine in ("vllm", "hf_generate"):
        positive(out[engine]["samples_per_s"], "min", "median", "max")
        positive(out[engine], "tokens_per_s_median")
        # every prompt of both timed calls answered with n samples
        assert out[engine]["samples"] == 2 * 2 * 2
        assert [c["samples"] for c in out["calls"][engine]] == [4, 4]
    positive(out, "speedup_samples_per_s", "speedup_tokens_per_s")
    assert out["setup"]["hf_threads"] in (1, 2)
    # both core counts tried for vLLM on a 2-core machine, the faster kept
    assert str(out["setup"]["vllm_cores"]) in out["setup"]["vllm_warmup_s"]
    assert set(out["setup"]["vllm_warmup_s"]) == {str(c) for c in (1, 2) if c <= (os.cpu_count() or 1)}
    # RePIC prompts: reference image(s) and the query
    assert out["setup"]["images_per_prompt_max"] >= 2


def test_rollout_variants_time_each_variant_on_the_same_batches(run_bench, positive):
    out = run_bench("rollout_variants.py", "--model", "tiny:qwen2.5-vl", "--variants", "detokenize,no_detokenize",
                    "--prompts", "2", "--n", "2", "--max-tokens", "8", "--calls", "2",
                    "--set", "rollout.enforce_eager", "true")
    for v in ("detokenize", "no_detokenize"):
        positive(out[v]["samples_per_s"], "min", "median", "max")
        assert [c["samples"] for c in out["calls"][v]] == [4, 4]
    assert out["detokenize"]["ratio_to_first_median"] == 1.0
    positive(out["no_detokenize"], "ratio_to_first_median")
    assert out["setup"]["recipe_enforce_eager"] is True
