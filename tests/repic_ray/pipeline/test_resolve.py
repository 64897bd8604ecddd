"""`resolve`: derived fields follow their source, and each cross-section rule fails at load
time with a message naming both fields. One test per rule."""

from pathlib import Path

import pytest
import yaml

from recipes.cli import main as repic_main
from repic_ray.config import ConfigError, dump_yaml, load_config
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.pipeline.resolve import resolve

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def load(*overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, TINY, list(overrides))


def test_samples_per_prompt_follow_group_size():
    assert load("--algo.group_size", "4").sampling.n == 4
    assert load("--algo.group_size", "4", "--sampling.n", "4").sampling.n == 4  # same value: fine
    with pytest.raises(ConfigError, match=r"sampling\.n \(6\).*algo\.group_size \(4\)"):
        load("--algo.group_size", "4", "--sampling.n", "6")


def test_loss_temperature_and_vision_block_follow_sampling():
    cfg = load("--sampling.temperature", "0.7", "--sampling.block_vision_tokens", "false")
    assert cfg.learner.loss.temperature == 0.7
    assert cfg.learner.loss.block_vision_tokens is False
    with pytest.raises(ConfigError, match=r"learner\.loss\.temperature.*sampling\.temperature"):
        load("--learner.loss.temperature", "0.5")
    with pytest.raises(ConfigError, match=r"learner\.loss\.block_vision_tokens.*sampling\.block_vision_tokens"):
        load("--learner.loss.block_vision_tokens", "false")


def test_one_seed_seeds_every_component():
    cfg = load("--trainer.seed", "7")
    assert (cfg.sampling.seed, cfg.rollout.seed, cfg.learner.seed) == (7, 7, 7)
    with pytest.raises(ConfigError, match=r"learner\.seed \(3\).*trainer\.seed \(7\)"):
        load("--trainer.seed", "7", "--learner.seed", "3")


def test_rollout_serves_the_learners_model():
    assert load("--learner.model", "tiny:qwen2.5-vl").rollout.model == "tiny:qwen2.5-vl"
    with pytest.raises(ConfigError, match=r"rollout\.model.*learner\.model"):
        load("--rollout.model", "other/model")


def test_lora_rank_must_fit_the_rollout_engine():
    lora_sync = ("--cluster.weight_sync", "lora", "--rollout.enable_lora", "true")
    with pytest.raises(ConfigError, match=r"learner\.lora\.r \(32\).*rollout\.max_lora_rank \(16\)"):
        load("--learner.lora.r", "32", *lora_sync)
    assert load("--learner.lora.r", "32", "--rollout.max_lora_rank", "32", *lora_sync).learner.lora.r == 32
    # merged-weight sync to an engine without LoRA: the engine's rank does not matter
    assert load("--learner.lora.r", "32").learner.lora.r == 32


def test_engine_must_take_the_worlds_largest_prompt():
    # the demo's world: up to 3 photos of each of 5 present + 2 absent concepts, then the query
    with pytest.raises(ConfigError, match=r"rollout\.limit_images_per_prompt \(21\).*22 images"
                                          r".*data\.world\.max_concepts_per_image"
                                          r".*references_per_concept=3"):
        load("--rollout.limit_images_per_prompt", "21")
    assert load().rollout.limit_images_per_prompt == 22
    one = ("--data.world.references_per_concept", "1")
    with pytest.raises(ConfigError, match=r"\(5\).*8 images"):
        load(*one, "--rollout.limit_images_per_prompt", "5")
    # fewer concepts per image and fewer absent references: 3 + 1 + the query fit in 5
    cfg = load(*one, "--rollout.limit_images_per_prompt", "5",
               "--data.world.max_concepts_per_image", "3", "--data.world.max_absent_refs", "1")
    assert cfg.rollout.limit_images_per_prompt == 5


def test_completion_budget_must_leave_room_for_the_prompt():
    with pytest.raises(ConfigError, match=r"sampling\.max_tokens \(1024\).*rollout\.max_model_len \(1024\)"):
        load("--sampling.max_tokens", "1024")
    with pytest.raises(ConfigError, match=r"eval_sampling\.max_tokens.*rollout\.max_model_len"):
        load("--eval_sampling.max_tokens", "2000")


def test_kl_in_reward_is_rejected_where_it_would_be_ignored():
    with pytest.raises(ConfigError, match=r"algo\.kl_in_reward.*algo\.estimator='grpo'"):
        load("--algo.kl_in_reward", "true", "--algo.kl_reward_beta", "0.01")
    cfg = load("--algo.estimator", "reinforce_pp", "--algo.kl_in_reward", "true", "--algo.kl_reward_beta", "0.01")
    assert cfg.algo.kl_in_reward
    with pytest.raises(ConfigError, match=r"algo\.kl_in_reward.*algo\.kl_reward_beta"):
        load("--algo.estimator", "reinforce_pp", "--algo.kl_in_reward", "true")
    with pytest.raises(ConfigError, match=r"algo\.kl_reward_beta.*algo\.kl_in_reward"):
        load("--algo.kl_reward_beta", "0.01")


def test_lora_weight_sync_needs_lora_on_both_sides():
    with pytest.raises(ConfigError, match=r"cluster\.weight_sync=lora.*learner\.lora\.enabled.*rollout\.enable_lora"):
        load("--learner.lora.enabled", "false", "--cluster.weight_sync", "lora", "--rollout.enable_lora", "true")
    with pytest.raises(ConfigError, match=r"cluster\.weight_sync=lora.*learner\.lora\.enabled.*rollout\.enable_lora"):
        load("--cluster.weight_sync", "lora")  # the tiny recipe's engine has no LoRA
    assert load("--learner.lora.enabled", "false", "--cluster.weight_sync", "full").cluster.weight_sync == "full"


def test_step_batch_must_split_over_learners():
    with pytest.raises(ConfigError,
                       match=r"algo\.prompts_per_step x algo\.group_size \(256\).*cluster\.num_learners \(3\)"):
        load("--cluster.num_learners", "3")


def test_ptx_batch_must_split_over_learners_and_its_settings_are_checked():
    with pytest.raises(ConfigError, match=r"algo\.ptx_batch_size \(15\).*cluster\.num_learners \(2\)"):
        load("--cluster.num_learners", "2", "--algo.ptx_coef", "0.1", "--algo.ptx_batch_size", "15")
    assert load("--cluster.num_learners", "2", "--algo.ptx_batch_size", "15").algo.ptx_coef == 0
    with pytest.raises(ValueError, match="ptx_coef >= 0"):
        load("--algo.ptx_coef", "-1")


def test_greedy_training_sampling_is_rejected():
    with pytest.raises(ConfigError, match=r"sampling\.temperature.*algo\.group_size"):
        load("--sampling.temperature", "0")


def test_resolve_is_pure_and_its_output_reloads_unchanged(tmp_path):
    cfg = load("--algo.group_size", "4")
    raw = ExperimentConfig()
    raw.algo.group_size = 3
    out = resolve(raw)
    assert raw.sampling.n == 8 and out.sampling.n == 3  # the input is not modified
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))  # every derived field written out, with its derived value
    assert load_config(ExperimentConfig, dumped) == cfg


def test_config_show_prints_the_resolved_yaml(capsys):
    assert repic_main(["config", "show", "--config", str(TINY), "--algo.group_size", "4",
                       "--trainer.seed", "5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["sampling"]["n"] == 4 and shown["learner"]["seed"] == 5 and shown["rollout"]["seed"] == 5
    assert shown["rollout"]["model"] == shown["learner"]["model"] == "checkpoints/tiny-open"
    assert repic_main(["config", "show", "--config", str(TINY), "--sampling.n", "3"]) == 2
    assert "sampling.n (3) is derived from algo.group_size (8)" in capsys.readouterr().err


def test_greedy_member_rules():
    assert load("--sampling.greedy_member", "true").sampling.greedy_member is True
    assert load("--sampling.greedy_member", "true", "--algo.mode", "async").sampling.greedy_member
    with pytest.raises(ConfigError, match=r"greedy_member.*algo\.mode=async.*sampling\.temperature 1"):
        load("--sampling.greedy_member", "true", "--algo.mode", "async", "--sampling.temperature", "0.7")
    with pytest.raises(ConfigError, match=r"eval_sampling\.greedy_member: evaluation samples one"):
        load("--eval_sampling.greedy_member", "true")


def test_gae_needs_the_critic_and_the_critic_needs_gae():
    with pytest.raises(ConfigError, match=r"algo\.estimator=gae needs a value model.*learner\.critic\.enabled true"):
        load("--algo.estimator", "gae")
    with pytest.raises(ConfigError, match=r"learner\.critic\.enabled.*algo\.estimator='grpo'"):
        load("--learner.critic.enabled", "true")
    cfg = load("--algo.estimator", "gae", "--learner.critic.enabled", "true")
    assert cfg.algo.estimator == "gae" and cfg.learner.critic.enabled
