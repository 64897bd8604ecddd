"""Fixtures of the rollout tests: images, an HF reference scorer, the shared vLLM engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .helpers import tiny_rollout_config


@pytest.fixture(scope="session")
def tiny_qwen_dir():
    from repic_ray.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def vllm_tiny_engine(tiny_qwen_dir):
    from vllm import LLM

    from repic_ray.rollout.vllm_engine import llm_kwargs

    llm = LLM(**llm_kwargs(tiny_rollout_config(str(tiny_qwen_dir))))
    yield llm
    llm.llm_engine.engine_core.shutdown()


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
