"""Tests for repic_ray/pipeline/pretrain_vision.py: the G1 gate metric, the episodes it
is measured on, and a few steps of the pretraining loop."""

import random

import pytest
import torch

from repic_ray.data.names import triple_split
from repic_ray.pipeline.pretrain_vision import (
    ATTRIBUTES,
    AttributeHeads,
    attribute_labels,
    encode_images,
    gate_episodes,
    nearest_reference_accuracy,
    nearest_reference_correct,
    pretrain_step,
    reinit_language_model,
    training_batch,
)


def test_nearest_reference_correct_by_cosine_with_masked_padding():
    # Query 0: cosines with refs are [1, 0, -1] -> ref 0. Target 0: correct.
    # Query 1: refs [ (1,0) scaled x10, (0.6,0.8) ]; query (0.8,0.6): cos 0.8 vs 0.96 -> ref 1
    #          (scale must not matter: cosine, not dot product). Target 0: wrong.
    # Query 2: ref 2 (padding, masked) is identical to the query; only refs 0-1 count:
    #          cos (1,0)=0, (0,1)=1 -> ref 1. Target 1: correct.
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    refs = torch.tensor([
        [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]],
        [[10.0, 0.0], [0.6, 0.8], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]],
    ])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    got = nearest_reference_correct(q, refs, mask, torch.tensor([0, 0, 1]))
    assert got.tolist() == [True, False, True]


def test_gate_episodes_use_held_out_triples_with_an_absent_reference():
    episodes = gate_episodes(30, seed=5)
    assert [len(e.references) for e in episodes] == [len(e.references) for e in gate_episodes(30, seed=5)]
    sizes = {len(e.references) for e in episodes}
    assert sizes <= {2, 3, 4, 5} and len(sizes) >= 3
    for e in episodes:
        assert 1 <= len(e.cell_of_ref) < len(e.references)  # at least one absent reference
        assert len(set(e.cell_of_ref.values())) == len(e.cell_of_ref)
        assert e.query.size == (84, 84) and all(r.size == (28, 28) for r in e.references)


def test_attribute_labels_and_training_batch_use_training_triples_only():
    assert attribute_labels(None) == [len(v) for v in ATTRIBUTES]
    assert attribute_labels(("circle", "red", "plain")) == [0, 0, 0]
    train, held = triple_split()
    images, labels = training_batch(random.Random(0), list(train), 4, 28)
    assert len(images) == 8 and labels.shape == (4 * 9 + 4, 3)
    seen = {tuple(v[i] for v, i in zip(ATTRIBUTES, row)) for row in labels.tolist()
            if row[0] < len(ATTRIBUTES[0])}
    assert seen and seen <= set(train) and seen.isdisjoint(held)
    # Each query has 1-5 objects; the other cells are "none".
    per_query = (labels[:36, 0] < len(ATTRIBUTES[0])).view(4, 9).sum(1)
    assert ((per_query >= 1) & (per_query <= 5)).all()


@pytest.fixture(scope="module")
def tiny_policy():
    from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint

    base = resolve_checkpoint("tiny:qwen2.5-vl")
    return load_policy(base), load_processor(base)


def test_query_token_i_is_cell_i(tiny_policy):
    # One object in cell c of an otherwise empty query: the token of cell c must differ
    # from the empty cells' most (merged token order is row-major over the 3x3 cells).
    from repic_ray.pipeline.pretrain_vision import draw_scene

    model, processor = tiny_policy
    rng = random.Random(1)
    for _ in range(3):
        img, per_cell = draw_scene(rng, [("star", "red", "dotted")], 28)
        cell = next(i for i, t in enumerate(per_cell) if t is not None)
        with torch.no_grad():
            (tokens,) = encode_images(model, processor, [img])
        assert tokens.shape[0] == 9
        others = torch.stack([t for i, t in enumerate(tokens) if i != cell]).mean(0)
        dist = (tokens - others).norm(dim=-1)
        assert dist.argmax().item() == cell


def test_a_few_pretraining_steps_lower_the_loss_and_train_only_the_tower(tiny_policy):
    model, processor = tiny_policy
    model = type(model)(model.config)  # a fresh copy: the fixture stays untouched
    model.load_state_dict(tiny_policy[0].state_dict())
    torch.manual_seed(0)
    lm_before = model.lm_head.weight.clone()
    model.requires_grad_(False)
    model.model.visual.requires_grad_(True)
    heads = AttributeHeads(model.config.text_config.hidden_size)
    opt = torch.optim.AdamW([*model.model.visual.parameters(), *heads.parameters()], lr=1e-3)
    images, labels = training_batch(random.Random(0), list(triple_split()[0]), 8, 28)
    losses = [pretrain_step(model, heads, processor, opt, images, labels)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5
    assert torch.equal(model.lm_head.weight, lm_before)
    result = nearest_reference_accuracy(model, processor, gate_episodes(6, seed=2))
    assert 0.0 <= result["accuracy"] <= 1.0 and result["queries"] >= 6
    assert set(result["by_num_refs"]) <= {2, 3, 4, 5}


def test_shipped_recipe_runs_briefly_and_writes_a_loadable_checkpoint(tmp_path):
    import json
    from pathlib import Path

    from repic_ray.config import load_config
    from repic_ray.models.loading import load_policy, resolve_checkpoint
    from repic_ray.pipeline.config import ExperimentConfig
    from repic_ray.pipeline.pretrain_vision import run_pretrain_vision

    recipe = Path(__file__).resolve().parents[3] / "configs" / "pretrain_vision_tiny.yaml"
    out = tmp_path / "vision"
    cfg = load_config(ExperimentConfig, recipe, [
        "--pretrain_vision.steps", "3", "--pretrain_vision.eval_every", "3",
        "--pretrain_vision.eval_episodes", "4", "--pretrain_vision.log_every", "1",
        "--pretrain_vision.output", str(out)])
    assert run_pretrain_vision(cfg) == out
    log = [json.loads(line) for line in (tmp_path / "vision_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and "gate_g1" in log[0] and "gate_g1" in log[-1]
    model = load_policy(str(out))
    base = load_policy(resolve_checkpoint(cfg.learner.model))
    # the recipe re-initialises the language model (language_init: torch)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(model.model.language_model.embed_tokens.weight,
                           base.model.language_model.embed_tokens.weight)
    assert not torch.equal(model.model.visual.merger.mlp[0].weight, base.model.visual.merger.mlp[0].weight)


def test_language_init_torch_gives_pytorch_default_scales_seeded_and_keeps_tower_and_norms(tiny_policy):
    def fresh():
        m = type(tiny_policy[0])(tiny_policy[0].config)
        m.load_state_dict(tiny_policy[0].state_dict())
        return m

    a, b = fresh(), fresh()
    q_before = a.model.language_model.layers[0].self_attn.q_proj.weight.std().item()
    assert reinit_language_model(a, seed=3) == reinit_language_model(b, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name  # same seed, same weights
    q = a.model.language_model.layers[0].self_attn.q_proj.weight
    # PyTorch's default Linear init: uniform(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert q.std().item() == pytest.approx((3 * q.shape[1]) ** -0.5, rel=0.1)
    assert q.std().item() > 2 * q_before  # the Hugging Face init (std 0.02) is much smaller
    emb = a.model.language_model.embed_tokens.weight
    assert emb.std().item() == pytest.approx(1.0, rel=0.05)  # normal(0, 1); HF: std 0.02
    ref = tiny_policy[0]
    assert torch.equal(a.model.visual.merger.mlp[0].weight, ref.model.visual.merger.mlp[0].weight)
    assert torch.equal(a.model.language_model.norm.weight, ref.model.language_model.norm.weight)
    c = fresh()
    reinit_language_model(c, seed=4)
    assert not torch.equal(c.lm_head.weight, a.lm_head.weight)


def test_language_init_rejects_unknown_values():
    from repic_ray.pipeline.config import VisionPretrainConfig

    with pytest.raises(ValueError, match="language_init"):
        VisionPretrainConfig(language_init="xavier")
