"""Deterministic, resumable prompt sampling over epochs.

The sampler's whole state is (seed, epoch, cursor): a checkpoint stores it and a
resumed run draws exactly the prompts the uninterrupted run would have drawn.
Every drawn item gets a uid `"{epoch}:{index}"` unique within the run, which the
driver uses to check that no sample is lost or duplicated when actors fail.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class SamplerState:
    seed: int
    epoch: int = 0
    cursor: int = 0


class PromptSampler(Generic[T]):
    """Shuffles `items` once per epoch (seeded by seed and epoch) and hands them out in order."""

    def __init__(self, items: Sequence[T], seed: int = 0):
        if not items:
            raise ValueError("PromptSampler needs at least one item")
        self.items = list(items)
        self.state = SamplerState(seed=seed)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.state.seed}:{epoch}").shuffle(order)
        return order

    def next(self, count: int) -> list[tuple[str, T]]:
        """The next `count` items as `(uid, item)`, crossing epoch boundaries as needed."""
        out: list[tuple[str, T]] = []
        while len(out) < count:
            if self.state.cursor >= len(self.items):
                self.state.epoch += 1
                self.state.cursor = 0
                self._order = self._permutation(self.state.epoch)
            idx = self._order[self.state.cursor]
            out.append((f"{self.state.epoch}:{idx}", self.items[idx]))
            self.state.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.state.seed, "epoch": self.state.epoch, "cursor": self.state.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.state = SamplerState(**state)
        self._order = self._permutation(self.state.epoch)
