"""Free TCP ports that a busy machine will not hand to someone else first.

A port found by binding to port 0 comes from Linux's ephemeral range (32768-60999), the
same range every outgoing connection draws from, so between "found free" and "bound by the
process group / vLLM / Ray" another process's outgoing connection can take it (EADDRINUSE,
seen on a loaded 2-core machine). Ports are therefore drawn below the ephemeral range.
"""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 20000, 32000


def free_port(low: int = LOW, high: int = HIGH, host: str = "") -> int:
    """A port in [low, high) that is free now."""
    return free_ports(1, low, high, host)[0]


def free_ports(n: int, low: int = LOW, high: int = HIGH, host: str = "") -> list[int]:
    """`n` distinct ports in [low, high) that are free now (all bound at once while chosen)."""
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        for _ in range(200 * n):
            if len(socks) == n:
                break
            port = rng.randrange(low, high)
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise RuntimeError(f"could not find {n} free ports in [{low}, {high})")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pin_vllm_port() -> None:
    """Make vLLM pick its internal ports (torch.distributed init, ZMQ) below the ephemeral
    range: with `VLLM_PORT` set it scans upward from there instead of binding port 0.
    A value the user set is kept."""
    os.environ.setdefault("VLLM_PORT", str(free_port()))
