"""`repic plan`: parameter counts against the models themselves, model states against
DeepSpeed's own estimators, hand-computed cases, placement, and a verdict for every
recipe under configs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repic_ray.config import load_config
from repic_ray.models.known import KNOWN_CONFIGS, shapes_config
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.plan import (
    Arch,
    Hardware,
    activation_bytes,
    kv_bytes_per_token,
    make_plan,
    model_states_bytes,
    place_group,
    resolve_arch,
)
from repic_ray.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
SEVEN_B = KNOWN_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"]


def _meta_model(cfg: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "vocab_size")}
    vision = {k: v for k, v in cfg["vision_config"].items() if k not in ("in_chans", "spatial_patch_size")}
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=cfg["tie_word_embeddings"]))


@pytest.mark.parametrize("cfg", [SEVEN_B, shapes_config()], ids=["7b", "7b-shapes"])
def test_parameter_counts_equal_the_models(cfg):
    model = _meta_model(cfg)
    arch = Arch.from_config(cfg, "test")
    assert arch.total_params() == sum(p.numel() for p in model.parameters())
    assert arch.vision_params() == sum(p.numel() for p in model.model.visual.parameters())
    if cfg is SEVEN_B:
        assert round(arch.total_params() / 1e9, 2) == 8.29  # "8.29B params" on the model card


def test_lora_parameter_count_equals_peft(tiny_qwen_dir):
    from peft import LoraConfig, get_peft_model

    from repic_ray.learner.config import LM_LORA_TARGET
    from repic_ray.models.loading import load_policy

    model = get_peft_model(load_policy(str(tiny_qwen_dir)), LoraConfig(r=16, target_modules=LM_LORA_TARGET))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = resolve_arch(str(tiny_qwen_dir))
    assert arch.lora_params(16) == trainable
    assert arch.total_params() == sum(p.numel() for p in model.parameters()) - trainable


@pytest.mark.parametrize("params,gpus,nodes", [(8_292_166_656, 8, 1), (7_000_000_000, 8, 2), (1_000_003, 3, 1)])
def test_model_states_equal_deepspeeds_estimators(params, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = gpus * nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)
    assert sum(model_states_bytes(params, 0, 2, n, "bf16").values()) == ds2
    largest = params // 10
    _, ds3, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                                      cpu_offload_params=False)
    assert sum(model_states_bytes(params, 0, 3, n, "bf16", largest).values()) == ds3


def test_model_states_hand_computed():
    # fp32, no ZeRO: weight 4 + grad 4 + Adam 8 per trainable parameter, frozen 4
    assert model_states_bytes(1000, 500, 0, 4, "fp32") == {
        "frozen_weights": 2000, "states_replicated": 16000, "states_partitioned": 0}
    # LoRA in bf16 under ZeRO-2 over 2 ranks: 10 adapters over 100 frozen weights
    assert model_states_bytes(10, 100, 2, 2, "bf16") == {
        "frozen_weights": 200, "states_replicated": 20, "states_partitioned": 90}
    # ZeRO-1 partitions only fp32 grads, master and moments; ZeRO-3 also the frozen base
    assert model_states_bytes(10, 0, 1, 2, "bf16")["states_partitioned"] == 80
    z3 = model_states_bytes(10, 100, 3, 4, "bf16", largest_layer=7)
    assert z3 == {"frozen_weights": 50, "states_replicated": 0, "states_partitioned": 45, "gathered_layer": 28}
    with pytest.raises(ValueError, match="stage"):
        model_states_bytes(1, 0, 4, 1, "bf16")


def test_kv_cache_and_activations_hand_computed():
    arch = Arch.from_config(SEVEN_B, "test")
    assert kv_bytes_per_token(arch, 2, 1) == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(arch, 2, 2) == 57344 // 2
    assert kv_bytes_per_token(arch, 2, 8) == 57344 // 4  # 4 KV heads on 8 shards: replicated
    acts = activation_bytes(arch, micro=1, seq_len=10, completion=4, dtype="bf16",
                            lora_dropout=False, checkpointing=False)
    h, kv, i = 3584, 512, 18944
    assert acts["layers"] == 10 * 28 * 2 * (10 * h + 2 * kv + 4 * i)
    assert acts["logits"] == 4 * 152064 * 14
    ckpt = activation_bytes(arch, 1, 10, 4, "bf16", False, True)
    assert ckpt["layers"] == 10 * (28 * 2 * h + 2 * (10 * h + 2 * kv + 4 * i))


def test_placement_strategies():
    def nodes():
        return [{"CPU": 8.0, "GPU": 2.0} for _ in range(3)]

    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert place_group(nodes(), [gpu] * 3, "PACK") == [0, 0, 1]
    assert place_group(nodes(), [gpu] * 3, "SPREAD") == [0, 1, 2]
    assert place_group(nodes(), [gpu] * 3, "STRICT_PACK") is None
    assert place_group(nodes(), [gpu] * 4, "STRICT_SPREAD") is None
    pool = nodes()
    assert place_group(pool, [gpu] * 2, "STRICT_PACK") == [0, 0]
    assert pool[0]["GPU"] == 0.0  # taken
    assert place_group(pool, [{"CPU": 1.0, "rollout_node": 1.0}], "PACK") is None


def _plan(recipe: str, overrides=(), **hw):
    cfg = load_config(ExperimentConfig, str(REPO / recipe), list(overrides))
    return make_plan(cfg, Hardware(**hw), recipe=recipe)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_gets_a_verdict(recipe):
    plan = _plan(recipe, nodes=2)
    assert plan.roles and all(r.nodes is not None for r in plan.roles)
    assert plan.fits, plan.problems


def test_7b_recipes_verdicts():
    one = _plan("configs/repic_qwen2_5_vl_7b.yaml")
    assert one.fits and one.params["trainable"] == Arch.from_config(SEVEN_B, "").lora_params(64)
    learner = next(r for r in one.roles if r.role == "learner")
    assert 20 * 2**30 < learner.need < 40 * 2**30
    # two nodes' worth of pinned roles on one node: the learners find no learner_node
    multi = _plan("configs/multinode/repic_7b_2x8gpu.yaml")
    assert not multi.fits and any("learner" in p and "placed" in p for p in multi.problems)
    assert _plan("configs/multinode/repic_7b_2x8gpu.yaml", nodes=2).fits
    # 24 GiB GPUs: the rollout's share leaves no KV cache for an 8192-token sequence
    small = _plan("configs/repic_qwen2_5_vl_7b.yaml", gpu_memory_gib=24)
    assert not small.fits and any("KV cache" in p for p in small.problems)
    # without gradient checkpointing the learner's activations do not fit 80 GiB
    nockpt = _plan("configs/repic_qwen2_5_vl_7b.yaml", ["--learner.gradient_checkpointing", "false"])
    assert any(p.startswith("learner: needs") for p in nockpt.problems)


def test_cli_prints_verdict_and_exit_status(capsys, child_env):
    assert plan_main(["--config", "configs/repic_qwen2_5_vl_7b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: fits" in out and "KV cache" in out and "[learner]" in out
    assert plan_main(["--config", "configs/multinode/repic_7b_2x8gpu.yaml", "--nodes", "1"]) == 1
    assert "VERDICT: does not fit" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not a known model"):
        plan_main(["--config", "configs/repic_qwen2_5_vl_7b.yaml", "--learner.model", "org/unknown-model"])
    # the `repic` command routes `plan` here
    res = subprocess.run([sys.executable, "-m", "recipes.cli", "plan", "--config",
                          "configs/multinode/repic_7b_2x8gpu.yaml", "--nodes", "2", "--json"],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert '"fits": true' in res.stdout
