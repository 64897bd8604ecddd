"""Degeneration watch: rollout length and repeated 4-grams against the first steps.

A policy that learns to loop on a rewarded phrase gets longer and more repetitive long
before an evaluation shows it. `DriftMonitor` keeps the mean rollout length and mean
repeated-4-gram rate of the first `baseline_steps` steps and, every step, reports

    response/length_drift          length_mean / baseline length (1 = unchanged)
    response/repeated_4gram_drift  repeated_4gram_mean - baseline rate
    response/drifted               1 when either is past its limit, else 0

with a warning (once when a limit is crossed, once when both are back within half
their limits) naming the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LENGTH_KEY = "response/length_mean"
REP4_KEY = "response/repeated_4gram_mean"


@dataclass
class DriftMonitor:
    """Rollout drift against the mean of the first `baseline_steps` steps."""

    baseline_steps: int = 5
    length_tolerance: float = 0.5
    """Warn when the mean rollout length is off the baseline by more than this fraction."""
    rep4_rise: float = 0.1
    """Warn when the repeated-4-gram rate rises more than this above the baseline."""
    _first: list[tuple[float, float]] = field(default_factory=list)
    _alarm: bool = False

    def __post_init__(self) -> None:
        if self.baseline_steps < 1:
            raise ValueError(f"baseline_steps: must be >= 1, got {self.baseline_steps}")
        if self.length_tolerance <= 0 or self.rep4_rise <= 0:
            raise ValueError("length_tolerance and rep4_rise must be > 0")

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the baseline steps seen and the alarm state."""
        return {"first": [list(x) for x in self._first], "alarm": self._alarm}

    def load_state_dict(self, state: dict) -> None:
        self._first = [(float(a), float(b)) for a, b in state["first"]]
        self._alarm = bool(state["alarm"])

    def baseline(self) -> tuple[float, float]:
        n = len(self._first)
        return sum(x for x, _ in self._first) / n, sum(r for _, r in self._first) / n

    def update(self, metrics: Mapping[str, float]) -> tuple[dict[str, float], str | None]:
        """Drift metrics of one step, and a warning message when the state changed."""
        length, rep4 = float(metrics[LENGTH_KEY]), float(metrics[REP4_KEY])
        if len(self._first) < self.baseline_steps:
            self._first.append((length, rep4))
        base_len, base_rep = self.baseline()
        ratio = length / base_len if base_len > 0 else 1.0
        rise = rep4 - base_rep
        if self._alarm:  # hysteresis: back only within half the limits (no flapping at the edge)
            alarm = abs(ratio - 1.0) > self.length_tolerance / 2 or rise > self.rep4_rise / 2
        else:
            alarm = abs(ratio - 1.0) > self.length_tolerance or rise > self.rep4_rise
        out = {
            "response/length_drift": ratio,
            "response/repeated_4gram_drift": rise,
            "response/drifted": float(alarm),
        }
        message = None
        if alarm != self._alarm:
            state = "drifted far from" if alarm else "back near"
            message = (
                f"rollouts {state} the first {len(self._first)} steps: mean length "
                f"{length:.1f} tokens vs {base_len:.1f} (x{ratio:.2f}, limit +-{self.length_tolerance:.0%}), "
                f"repeated 4-grams {rep4:.3f} vs {base_rep:.3f} (limit +{self.rep4_rise})"
            )
            if alarm:
                message += "; the policy may be degenerating (read the rollouts, raise the KL or caption reward)"
        self._alarm = alarm
        return out, message
