"""bench/bench_perception.py end to end, reduced: CLIP retrieval, detector AP50, the
detector reward's verdicts and the retriever, each on a few images."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_perception_bench_measures_every_model(run_bench):
    out = run_bench("bench_perception.py", "--episodes", "1", "--queries", "2", "--images", "8")
    for label in ("shipped", "random"):
        clip = out["clip"][label]
        assert all(0 <= clip[f"top1_unseen_{n}"] <= 1 for n in (8, 12, 16, 20))
        det = out["detector"][label]
        assert det["images"] == 8 and 0 <= det["ap50"] <= 1
        rew = out["detector_reward"][label]
        assert rew["images"] == 2 and 0 <= rew["auc"] <= 1
        assert 0 <= rew["verified_absent"] <= 1 and 0 <= rew["verified_present"] <= 1
    # The random detector's scores pass every threshold or none: it verifies present and
    # absent categories alike.
    rand = out["detector_reward"]["random"]
    assert rand["verified_present"] == rand["verified_absent"]
    assert set(out["retriever"]) == {"box_threshold", "top1_unseen_8", "top1_unseen_20"}
    assert out["command"].startswith("python bench/bench_perception.py")
