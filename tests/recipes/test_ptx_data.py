"""The PPO-ptx term's SFT data: a clear error before any actor starts when there is none."""

from __future__ import annotations

import pytest

from recipes.train import ptx_samples
from repic_ray.config import load_config
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.pipeline.episodes import RunData


def test_empty_sft_file_says_what_to_set(tmp_path):
    # the open-world demo's world has no SFT captions (data.world.num_sft: 0)
    cfg = load_config(ExperimentConfig, "configs/tiny_cpu.yaml", ["--algo.ptx_coef", "0.1"])
    empty = tmp_path / "sft.jsonl"
    empty.write_text("")
    data = RunData(train=[], eval_splits={}, database=None, sft_path=empty)
    with pytest.raises(ValueError, match=r"has none.*num_sft: 0.*data\.sft_file.*ptx_coef 0"):
        ptx_samples(cfg, data)
    with pytest.raises(ValueError, match="does not exist"):
        ptx_samples(cfg, RunData(train=[], eval_splits={}, database=None, sft_path=tmp_path / "missing"))
