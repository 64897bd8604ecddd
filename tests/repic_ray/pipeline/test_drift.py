"""Tests for repic_ray/pipeline/drift.py: drift metrics and the warning."""

import pytest

from repic_ray.pipeline.drift import DriftMonitor


def step(length, rep4):
    return {"response/length_mean": length, "response/repeated_4gram_mean": rep4}


def test_baseline_is_the_first_steps_and_drift_is_measured_against_it():
    mon = DriftMonitor(baseline_steps=2, length_tolerance=0.5, rep4_rise=0.1)
    out, msg = mon.update(step(30.0, 0.02))
    assert out == {"response/length_drift": 1.0, "response/repeated_4gram_drift": 0.0, "response/drifted": 0.0}
    assert msg is None
    mon.update(step(34.0, 0.04))  # baseline: length 32, rep4 0.03
    out, msg = mon.update(step(40.0, 0.10))  # x1.25, +0.07: within limits
    assert out["response/length_drift"] == pytest.approx(40 / 32)
    assert out["response/repeated_4gram_drift"] == pytest.approx(0.07)
    assert out["response/drifted"] == 0.0 and msg is None
    assert mon.baseline() == pytest.approx((32.0, 0.03))


def test_warns_once_when_rollouts_loop_and_once_when_back():
    mon = DriftMonitor(baseline_steps=1, length_tolerance=0.5, rep4_rise=0.1)
    mon.update(step(35.0, 0.01))
    out, msg = mon.update(step(57.0, 0.45))  # the looping captions of an unregularized run
    assert out["response/drifted"] == 1.0
    assert "drifted far" in msg and "57.0" in msg and "0.450" in msg
    out, msg = mon.update(step(60.0, 0.5))
    assert out["response/drifted"] == 1.0 and msg is None  # no repeat while it stays bad
    # x1.4 is within the limit, but not within half of it: still drifted, no new warning
    out, msg = mon.update(step(49.0, 0.02))
    assert out["response/drifted"] == 1.0 and msg is None
    out, msg = mon.update(step(36.0, 0.02))
    assert out["response/drifted"] == 0.0 and "back near" in msg


def test_shorter_rollouts_also_count():
    mon = DriftMonitor(baseline_steps=1, length_tolerance=0.5)
    mon.update(step(40.0, 0.0))
    out, msg = mon.update(step(10.0, 0.0))
    assert out["response/drifted"] == 1.0 and msg


def test_bad_settings():
    with pytest.raises(ValueError, match="baseline_steps"):
        DriftMonitor(baseline_steps=0)
    with pytest.raises(ValueError, match="rep4_rise"):
        DriftMonitor(rep4_rise=0)
