"""Run metrics: one JSONL line per step (and TensorBoard scalars), resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends step metrics to `{out}/metrics.jsonl` and TensorBoard under `{out}/tb`."""

    def __init__(self, out: str | Path, *, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tb"))

    def write(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self._tb is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def truncate(self, step: int) -> None:
        """Drop lines after `step` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the torn last line of a process killed mid-write
                continue
            if row["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def evaluate_split_metrics(records, path: str | Path, candidates: list[str] | None = None) -> dict[str, Any]:
    """Save one split's captions (RePIC result format) and score them with RePIC's metric.

    `candidates`: every concept name of the user's database, so naming a concept that
    is not in the image counts against precision ("MISS").
    """
    from repic_ray.data.formats import save_captions
    from repic_ray.evaluation.metric import evaluate_names

    save_captions(records, path)
    ev = evaluate_names([r.caption for r in records], [r.concepts for r in records], candidates=candidates)
    return ev.overall.as_dict()
