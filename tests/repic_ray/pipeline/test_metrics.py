"""The run's metrics file survives a kill: truncation on resume drops a torn last line."""

from __future__ import annotations

from repic_ray.pipeline.metrics import MetricsWriter


def test_truncate_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write({"step": step, "reward/total_mean": step / 10})
    with writer.path.open("a") as f:
        f.write('{"reward/total_mean": 0.4, "st')  # killed mid-write of step 4
    writer.truncate(2)
    assert [r["step"] for r in writer.read()] == [1, 2]
    writer.write({"step": 3, "reward/total_mean": 0.3})
    assert [r["step"] for r in writer.read()] == [1, 2, 3]
