"""bench/common.py and the TRL adapter's pure pieces: tables, throughput, prompt conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import markdown_table, rollout_throughput, spread
from repic_ray.rollout.types import Completion, RolloutResult


def _completion(tokens: int) -> Completion:
    return Completion(text="x", token_ids=list(range(tokens)), logprobs=[0.0] * tokens, finish_reason="stop",
                      policy_version=0)


def test_rollout_throughput_counts_generated_tokens():
    results = [RolloutResult("a", [_completion(3), _completion(5)]), RolloutResult("b", [_completion(4)])]
    out = rollout_throughput(results, seconds=2.0)
    # 3 samples and 3 + 5 + 4 = 12 tokens in 2 s
    assert out["samples"] == 3 and out["completion_tokens"] == 12
    assert out["samples_per_s"] == pytest.approx(1.5)
    assert out["tokens_per_s"] == pytest.approx(6.0)
    assert out["mean_completion_tokens"] == pytest.approx(4.0)


def test_markdown_table_formats_rows():
    table = markdown_table(["engine", "samples/s"], [["vllm", 12.3456], ["hf", 1234.5]])
    assert table.splitlines() == ["| engine | samples/s |", "|---|---|", "| vllm | 12.3 |", "| hf | 1234 |"]


def test_trl_messages_turn_image_parts_into_placeholders_in_place():
    from bench.trl_grpo import trl_messages

    messages = [{"role": "user", "content": [
        {"type": "image", "image": "/ref.png"}, {"type": "text", "text": "This is <Bo>.\n"},
        {"type": "image", "image": "/query.png"}, {"type": "text", "text": "Describe."}]}]
    out = trl_messages(messages)
    # image order and position kept (references first, each followed by its name), paths removed
    assert out == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "This is <Bo>.\n"},
        {"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert messages[0]["content"][0]["image"] == "/ref.png"  # input untouched


def test_spread_gives_min_median_max():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0, "n": 4}
    with pytest.raises(ValueError):
        spread([])


def test_trl_gets_the_prompts_our_sampler_draws_in_order():
    from bench.trl_grpo import sampler_order
    from repic_ray.pipeline.sampler import PromptSampler

    items = list(range(10))
    sampler = PromptSampler(items, seed=3)
    ours = [x for _ in range(4) for _, x in sampler.next(3)]  # 4 steps of 3 prompts: crosses an epoch
    assert sampler_order(items, seed=3, prompts_per_step=3, steps=4) == ours
    assert ours != items + items[:2]  # shuffled, not the first items in file order


def test_report_rewrites_marked_tables_from_result_files(tmp_path):
    import json

    from bench.report import rewrite

    results = tmp_path / "results"
    results.mkdir()
    machine = {"cpu_count": 2, "gpu": None, "load_avg_1_5_15_at_start": [0.5, 0.4, 0.3],
               "load_avg_1_5_15_at_end": [1.0, 0.6, 0.4]}
    rollout = {"vllm": {"samples_per_s": {"min": 30.0, "median": 36.0, "max": 40.0},
                        "tokens_per_s_median": 1500.0, "mean_completion_tokens": 41.0},
               "hf_generate": {"samples_per_s": {"min": 10.0, "median": 12.0, "max": 13.0},
                               "tokens_per_s_median": 500.0, "mean_completion_tokens": 42.0},
               "speedup_samples_per_s": 3.0, "speedup_tokens_per_s": 3.0, "setup": {"hf_threads": 2},
               "machine": machine, "command": "bench/bench_rollout.py --iters 5"}
    (results / "rollout.json").write_text(json.dumps(rollout))
    text = ("# B\n<!-- result: rollout -->\nstale numbers\n<!-- /result -->\n"
            "<!-- result: rl_step -->\nold\n<!-- /result -->\n")
    new = rewrite(text, results)
    assert "stale numbers" not in new and "| vllm | 36 (30-40) |" in new and "**3.00x**" in new
    assert "load (1/5/15 min) at start 0.5/0.4/0.3" in new and "bench/bench_rollout.py --iters 5" in new
    # A table whose result file does not exist says so instead of keeping old numbers.
    assert "old" not in new and "has not been produced" in new
    assert rewrite(new, results) == new  # idempotent
