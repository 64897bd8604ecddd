"""Every YAML recipe under configs/ (recursively) loads into the experiment config."""

from pathlib import Path

import pytest

from repic_ray.config import ConfigError, load_config
from repic_ray.pipeline.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))


def test_recipes_found_recursively():
    assert any(p.parent.name == "multinode" for p in RECIPES)
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads(path):
    cfg = load_config(ExperimentConfig, path)
    assert cfg.name


def test_paper_recipe_matches_repic():
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "repic_qwen2_5_vl_7b.yaml")
    assert (cfg.learner.lora.r, cfg.learner.lora.alpha, cfg.learner.lora.dropout) == (64, 128.0, 0.05)
    assert cfg.algo.group_size == 8 and cfg.learner.loss.kl_beta == 0.04 and cfg.learner.lr == 1e-5
    assert cfg.learner.zero_stage == 2 and cfg.learner.dtype == "bf16" and cfg.learner.freeze_vision
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.max_tokens == 256


def test_multinode_inherits_and_overrides():
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "multinode" / "repic_7b_2x8gpu.yaml")
    assert cfg.learner.lora.r == 64  # from the included recipe
    assert cfg.cluster.num_learners == 8 and cfg.cluster.rollout.resources == {"rollout_node": 1.0}


def test_typo_in_recipe_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match=r"algo\.group_sise.*algo\.group_size"):
        load_config(ExperimentConfig, bad)


def test_override_on_top_of_recipe():
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "tiny_cpu.yaml", ["--cluster.num_rollout_workers", "4"])
    assert cfg.cluster.num_rollout_workers == 4


def test_sync_learner_takes_the_idle_rollout_cpus_only_where_the_roles_alternate_on_one_node():
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "tiny_cpu.yaml")
    c = cfg.cluster
    assert c.sync_learner_takes_rollout_cpus and cfg.algo.mode == "sync"
    assert c.learner_threads("sync", cpus=2) == 2  # its own core + the rollout worker's
    assert c.learner_threads("sync", cpus=1) == 1  # never more threads than cores
    assert c.learner_threads("async", cpus=2) == 0  # generation runs beside the update
    more = load_config(ExperimentConfig, ROOT / "configs" / "tiny_cpu.yaml", ["--cluster.num_rollout_workers", "2"])
    assert more.cluster.learner_threads("sync", cpus=8) == 3
    for override in (["--cluster.address", "auto"], ["--cluster.num_learners", "2"],
                     ["--cluster.learner.num_gpus", "1"], ["--cluster.sync_learner_takes_rollout_cpus", "false"]):
        other = load_config(ExperimentConfig, ROOT / "configs" / "tiny_cpu.yaml", override)
        assert other.cluster.learner_threads("sync", cpus=2) == 0, override
    pinned = load_config(ExperimentConfig, ROOT / "configs" / "tiny_cpu.yaml", ["--cluster.learner.num_threads", "1"])
    assert pinned.cluster.learner_threads("sync", cpus=2) == 1  # an explicit setting wins
