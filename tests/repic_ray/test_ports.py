"""Free ports come from below Linux's ephemeral range and are really bindable."""

from __future__ import annotations

import socket

import pytest

from repic_ray import ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    found = ports.free_ports(5)
    assert len(set(found)) == 5
    assert all(ports.LOW <= p < ports.HIGH < 32768 for p in found)
    socks = [socket.socket() for _ in found]
    try:
        for s, p in zip(socks, found, strict=True):
            s.bind(("", p))  # all five at once
    finally:
        for s in socks:
            s.close()


def test_a_range_with_no_free_port_fails_clearly():
    with socket.socket() as s:
        s.bind(("", 0))
        taken = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="free ports"):
            ports.free_ports(1, low=taken, high=taken + 1)


def test_pin_vllm_port_keeps_a_user_setting(monkeypatch):
    monkeypatch.setenv("VLLM_PORT", "23456")
    ports.pin_vllm_port()
    assert ports.os.environ["VLLM_PORT"] == "23456"
    monkeypatch.delenv("VLLM_PORT")
    ports.pin_vllm_port()
    assert ports.LOW <= int(ports.os.environ["VLLM_PORT"]) < ports.HIGH
