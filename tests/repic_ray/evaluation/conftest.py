"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest

from repic_ray.data.synthetic import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world: 4 concepts, up to 3 per query, 2 queries per k."""
    out = tmp_path_factory.mktemp("world")
    generate_world(
        out,
        num_concepts=4,
        num_train=4,
        num_sft=0,
        num_sft_aux=0,
        num_eval_per_k=2,
        max_concepts_per_image=3,
        max_distractors=1,
    )
    return out
