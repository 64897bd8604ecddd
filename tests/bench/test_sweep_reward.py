"""bench/sweep_reward.py's target check and tables on hand-built rows (the runs themselves
are the main job, tested in tests/recipes)."""

from __future__ import annotations

import copy

from bench.sweep_reward import missed_targets, seed_table, table


def _evals(f1, p, cider, cider_k1, rep4, words, at_cap=0.0) -> dict:
    quality = {k: {"rep4": rep4, "mean_words": words} for k in ("k1", "k3", "pooled")}
    return {"k3plus_f1": f1, "k3plus_precision": p, "k3plus_recall": f1, "k1_f1": 0.9,
            "precision_by_k": {"k3": p, "k4": p, "k5": p}, "cider_d": cider, "cider_d_k1": cider_k1,
            "rep4": rep4, "mean_words": words, "at_cap": at_cap, "quality": quality}


def _row(seed, after) -> dict:
    return {"setting": "s", "seed": seed, "steps": 60, "wall_s": 180.0,
            "before": _evals(0.40, 0.93, 0.82, 2.78, 0.04, 36.0), "after": after}


def test_missed_targets_names_each_failed_target():
    good = _row(0, _evals(0.65, 0.95, 0.90, 2.80, 0.05, 38.0))
    assert missed_targets(good) == []
    bad = copy.deepcopy(good)
    bad["after"].update(k3plus_f1=0.55, k3plus_precision=0.90, cider_d=0.5, at_cap=0.1)
    bad["after"]["precision_by_k"]["k5"] = 0.5
    bad["after"]["quality"]["k3"] = {"rep4": 0.2, "mean_words": 60.0}
    assert missed_targets(bad) == ["F1+20", "P k5,pooled", "CIDEr-D", "rep-4gram", "length", "at cap"]


def test_tables_show_each_run_and_the_mean_over_seeds():
    rows = [_row(0, _evals(0.55, 0.95, 0.90, 2.60, 0.02, 35.0)),
            _row(1, _evals(0.65, 0.97, 0.70, 2.40, 0.10, 36.0))]
    runs = table(rows)
    assert runs.count("\n") == 3 and "39.9" not in runs and "40.0 → 55.0" in runs
    over = seed_table(rows)
    # F1 change +15 and +25 points: mean +20.0 (+15.0..+25.0); neither seed meets every target
    assert "| s | 60 | 0,1 | +20.0 (+15.0..+25.0) |" in over and over.endswith("0 of 2 |")
    assert seed_table(rows[:1]).count("\n") == 1  # one seed: no mean row
