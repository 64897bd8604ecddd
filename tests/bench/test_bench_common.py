"""bench/common.py and the TRL adapter's pure pieces: tables, throughput, prompt conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import markdown_table, rollout_throughput
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
