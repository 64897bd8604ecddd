"""Fixtures shared by the deployment tests: short private temp dirs, Ray auth env and a
headless Chromium for the web page tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def chromium() -> str:
    """Path of a Chromium for Playwright (installed by .ci/setup-chromium.sh when missing);
    the test is skipped where none can be installed."""
    path = shutil.which("chromium")
    if path is None:
        subprocess.run(["bash", str(REPO / ".ci/setup-chromium.sh")], check=False)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium cannot be installed here")
    return path


@pytest.fixture
def short_tmp():
    """A private directory with a short path: Ray's Unix sockets live under the temp dir
    and a socket path may not exceed 107 bytes (pytest's tmp_path is often too long)."""
    path = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_env(short_tmp, monkeypatch) -> dict[str, str]:
    """Environment of a private Ray cluster: its own temp root (so the
    `ray_current_cluster` address file of other clusters on the machine is neither read
    nor overwritten) and token auth with a per-test token (not ~/.ray/auth_token)."""
    env = {
        "RAY_TMPDIR": str(short_tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return env

