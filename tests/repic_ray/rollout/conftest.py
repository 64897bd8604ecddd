"""Fixtures of the rollout tests (the tiny checkpoint and the vLLM engine come from tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory):
    """Five random RGB images of different sizes (1 to 4 vision tokens each)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(28, 28), (56, 28), (28, 56), (56, 56), (28, 28)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths
