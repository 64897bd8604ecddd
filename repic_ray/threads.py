"""Scoped torch thread counts, so a training entry point run inside another program
(a notebook, a test session, a Ray worker) leaves that program's setting as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(n)` (unchanged when `n` is falsy) and
    restore the previous count afterwards, also on error."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
