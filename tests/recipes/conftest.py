"""A private local Ray cluster for the tests of one module (recipes and actors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    assert not ray.is_initialized(), "another test module left Ray running"
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "REPIC_CACHE", "TORCH_EXTENSIONS_DIR",
                                        "TOKENIZERS_PARALLELISM") if k in os.environ}
    env["PYTHONPATH"] = str(REPO)
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
