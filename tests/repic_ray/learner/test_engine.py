"""LearnerEngine (LoRA, ZeRO-2, fp32 on CPU) against plain transformers / peft.

One engine for the whole module; tests that train leave it trained, so each test
only relies on what it sets up itself (or on the reference policy, which training
never changes).
"""

from __future__ import annotations

import json

import pytest
import torch

from repic_ray.data.images import load_image
from repic_ray.learner import LearnerEngine, TrainBatch
from repic_ray.models.loading import load_policy, qwen_mm_inputs, vision_special_token_ids
from repic_ray.ports import free_port

from .helpers import (
    hf_logprobs,
    rl_rows,
    rollout_logit_bias,
    sft_batch,
    tiny_config,
    train_batch,
    write_images,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("learner_images"))


@pytest.fixture(scope="module")
def learner():
    return LearnerEngine(tiny_config(), master_port=free_port())


@pytest.fixture(scope="module")
def hf_base():
    return load_policy("tiny:qwen2.5-vl")


def _lora_params(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.module.named_parameters() if "lora_" in n}


def _step_away_from_init(learner, images, steps: int = 2) -> TrainBatch:
    """Train a couple of steps so LoRA B (zero at init) is non-zero."""
    batch = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5])
    batch.old_logprobs_BT = learner.compute_logprobs(batch)
    for _ in range(steps):
        learner.train_step(batch)
    return batch


def test_ref_logprobs_equal_unbatched_hf_forward(learner, hf_base, images):
    # The reference pass (adapter disabled) is the base model: batched, right-padded
    # micro-batches of mixed multi-image / text-only rows must give exactly what one
    # unpadded HF forward per sequence gives.
    batch = train_batch(learner.processor, images, [0.0] * 4)
    got_BT = learner.compute_ref_logprobs(batch)
    for b in range(len(batch)):
        want_T = hf_logprobs(
            hf_base,
            learner.processor,
            batch.prompt_texts[b],
            batch.image_paths[b],
            batch.completion_ids[b],
        )
        n = len(batch.completion_ids[b])
        torch.testing.assert_close(got_BT[b, :n], want_T)
        assert torch.all(got_BT[b, n:] == 0.0)


def test_logprobs_match_generate_mrope_positions(learner, hf_base, images):
    # HF `generate` decodes with the cached M-RoPE deltas (positions continue after the
    # 3x3 query's spatial extent, not after its 9 tokens). The learner's single forward
    # over prompt + completion must give the same log-probs as the logits generate saw.
    proc = learner.processor
    prompt = train_batch(proc, images, [0.0] * 4).prompt_texts[0]
    paths = [images["ref0"], images["ref1"], images["query0"]]
    enc = qwen_mm_inputs(proc, prompt, [load_image(p) for p in paths])
    hf_base.model.rope_deltas = None
    out = hf_base.generate(
        **enc,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        suppress_tokens=vision_special_token_ids(proc),
        output_logits=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
    raw_logits = torch.stack(out.logits, 1)[0].float()
    raw_logits = raw_logits + rollout_logit_bias(proc, raw_logits.shape[-1])
    want_T = torch.log_softmax(raw_logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    batch = TrainBatch([prompt], [paths], [completion], torch.zeros(1, 6), torch.zeros(1))
    got_T = learner.compute_ref_logprobs(batch)[0]
    torch.testing.assert_close(got_T, want_T)

    # Control: the same forward without mm_token_type_ids falls back to 1D positions and
    # drifts, so the equality above really checks the 3D positions.
    mi = learner.build_inputs(batch.prompt_texts, batch.image_paths, batch.completion_ids)
    del mi.inputs["mm_token_type_ids"]
    with torch.no_grad(), learner.module.policy.disable_adapter():
        learner.engine.eval()
        logits_BTV, _ = learner.engine(mi.inputs, mi.positions_BT)
    drift_T = torch.log_softmax(logits_BTV[0].float(), -1).gather(-1, mi.targets_BT[0][:, None])[
        :, 0
    ]
    assert (drift_T - want_T).abs().max() > 1e-4


def test_grpo_step_changes_lora_only(learner, images):
    before = {n: p.detach().clone() for n, p in learner.module.named_parameters()}
    batch = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5])
    batch.old_logprobs_BT = learner.compute_logprobs(batch)
    version = learner.policy_version
    for _ in range(2):  # lora_A gets gradient only once lora_B is non-zero
        stats = learner.train_step(batch)
    assert learner.policy_version == version + 2 == stats.policy_version
    assert stats.tokens == sum(len(c) for c in batch.completion_ids)
    after = dict(learner.module.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(".visual." not in n for n in lora)
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        assert changed == ("lora_" in name), name
        assert after[name].requires_grad == ("lora_" in name), name


def test_repeated_steps_raise_positive_completion(learner, images):
    # One completion with advantage +1, the others negative (zero-mean, as GRPO makes
    # them); old log-probs fixed at the start. The objective must go down step after
    # step and the positive completion's log-likelihood must go up.
    batch = train_batch(learner.processor, images, [1.0, -1 / 3, -1 / 3, -1 / 3])
    batch.old_logprobs_BT = learner.compute_logprobs(batch)
    start = batch.old_logprobs_BT[0].sum()
    losses = [learner.train_step(batch).loss for _ in range(4)]
    assert losses[-1] < losses[0]
    assert learner.compute_logprobs(batch)[0].sum() > start + 0.1


def test_micro_batching_and_checkpoint_resume(learner, images, tmp_path):
    # Save; one step with micro-batches of 2; reload; the same step with micro-batches
    # of 1 (4 accumulated backward passes) must give the same loss, gradient norm and
    # weights. A second step after each restore checks the optimizer state came back.
    batch = _step_away_from_init(learner, images, steps=1)
    learner.save_checkpoint(tmp_path)
    version = learner.policy_version

    def two_steps(micro):
        learner.cfg.micro_batch_size = micro
        s1, s2 = learner.train_step(batch), learner.train_step(batch)
        return s1, s2, _lora_params(learner)

    try:
        a1, a2, lora_a = two_steps(2)
        learner.load_checkpoint(tmp_path)
        assert learner.policy_version == version
        b1, b2, lora_b = two_steps(1)
        learner.load_checkpoint(tmp_path)
        c1, c2, lora_c = two_steps(2)
    finally:
        learner.cfg.micro_batch_size = 2
    # same micro size after a restore: bit-identical resumption
    assert (c1.loss, c2.loss, c1.grad_norm, c2.grad_norm) == (
        a1.loss,
        a2.loss,
        a1.grad_norm,
        a2.grad_norm,
    )
    for name in lora_a:
        assert torch.equal(lora_a[name], lora_c[name]), name
    # micro 1 vs 2: equal up to fp32 summation order
    for x, y in [(a1, b1), (a2, b2)]:
        for field in ("loss", "policy_loss", "kl", "clip_frac", "entropy", "grad_norm"):
            got, want = (torch.tensor(getattr(s, field), dtype=torch.float32) for s in (y, x))
            torch.testing.assert_close(got, want, msg=field)
    for name in lora_a:
        torch.testing.assert_close(lora_b[name], lora_a[name], msg=name)


def test_on_policy_step_equals_a_separate_logprob_pass(learner, images, tmp_path):
    # One update on rollouts of the current weights: old log-probs from the training
    # forward (detached) must give the update a separate no-grad pass gives (ratio 1 in
    # both: same loss, clip fraction 0, same gradient and weights), and the mismatch
    # against the log-probs sent must be measured on that forward.
    _step_away_from_init(learner, images, steps=1)
    learner.save_checkpoint(tmp_path)
    rollout_BT = learner.compute_logprobs(train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5]))
    noisy_BT = rollout_BT + 0.01 * train_batch(learner.processor, images, [0.0] * 4).mask_BT

    sep = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5], old_logprobs_BT=rollout_BT.clone())
    a = learner.train_step(sep)
    lora_a = _lora_params(learner)
    learner.load_checkpoint(tmp_path)
    on = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5], old_logprobs_BT=noisy_BT)
    on.on_policy = True
    b = learner.train_step(on)
    lora_b = _lora_params(learner)
    for field in ("loss", "policy_loss", "kl", "clip_frac", "entropy", "grad_norm"):
        torch.testing.assert_close(torch.tensor(getattr(b, field)), torch.tensor(getattr(a, field)), msg=field)
    assert b.clip_frac == 0.0
    for name in lora_a:
        torch.testing.assert_close(lora_b[name], lora_a[name], msg=name)
    # |forward - sent| = 0.01 on every completion token (the sent ones were shifted by 0.01)
    torch.testing.assert_close(torch.tensor(b.logprob_mismatch), torch.tensor(0.01), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(a.logprob_mismatch), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_on_policy_step_with_dropout_takes_old_logprobs_from_an_eval_pass(images, tmp_path):
    # With LoRA dropout the training forward is not the policy's distribution: an
    # on-policy batch then gets its old log-probs from one eval pass inside train_step,
    # exactly what the driver's separate pass gave (same update, dropout masks included).
    from repic_ray.learner import LoraConfig

    eng = LearnerEngine(tiny_config(lora=LoraConfig(r=8, alpha=16.0, dropout=0.2)), master_port=free_port())
    try:
        assert eng.dropout_active
        _step_away_from_init(eng, images, steps=1)
        eng.save_checkpoint(tmp_path)
        adv = [1.0, -1.0, 0.5, -0.5]
        sep = train_batch(eng.processor, images, adv)
        sep.old_logprobs_BT = eng.compute_logprobs(sep)
        a = eng.train_step(sep)
        lora_a = _lora_params(eng)
        eng.load_checkpoint(tmp_path)
        on = train_batch(eng.processor, images, adv, old_logprobs_BT=sep.old_logprobs_BT - 0.01)
        on.on_policy = True
        b = eng.train_step(on)
        for field in ("loss", "policy_loss", "kl", "clip_frac", "grad_norm"):
            torch.testing.assert_close(torch.tensor(getattr(b, field)), torch.tensor(getattr(a, field)), msg=field)
        for name, value in _lora_params(eng).items():
            torch.testing.assert_close(value, lora_a[name], msg=name)
        torch.testing.assert_close(torch.tensor(b.logprob_mismatch), torch.tensor(0.01), atol=1e-5, rtol=0)
    finally:
        eng.close()


def test_export_lora_round_trips_into_peft(learner, images, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    batch = _step_away_from_init(learner, images)
    tensors, config = learner.export_lora()
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    # written exactly as save_pretrained lays it out, then loaded by peft
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = PeftModel.from_pretrained(load_policy("tiny:qwen2.5-vl"), str(tmp_path)).eval()
    got_BT = learner.compute_logprobs(batch)
    for b in range(len(batch)):
        want_T = hf_logprobs(
            fresh,
            learner.processor,
            batch.prompt_texts[b],
            batch.image_paths[b],
            batch.completion_ids[b],
        )
        torch.testing.assert_close(got_BT[b, : len(want_T)], want_T)
    # and the adapter is not a no-op: the base model gives other log-probs
    assert (learner.compute_ref_logprobs(batch) - got_BT).abs().max() > 1e-4


def test_export_full_equals_peft_merge_and_leaves_model_untouched(learner, images, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    _step_away_from_init(learner, images)
    before = {n: p.detach().clone() for n, p in learner.module.named_parameters()}
    merged = learner.export_full()
    for name, p in learner.module.named_parameters():
        assert torch.equal(before[name], p.detach()), name

    tensors, config = learner.export_lora()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peft_model = PeftModel.from_pretrained(load_policy("tiny:qwen2.5-vl"), str(tmp_path))
    want = peft_model.merge_and_unload().state_dict()
    assert list(merged) == list(want)
    assert list(merged) == list(load_policy("tiny:qwen2.5-vl").state_dict())
    for key in want:
        torch.testing.assert_close(merged[key], want[key], msg=key)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        merged[q], before[f"policy.base_model.model.{q.replace('.weight', '.base_layer.weight')}"]
    )


def test_sft_step_lowers_cross_entropy(learner, images):
    batch = sft_batch(learner.processor, images, weight_names=True)
    mask_BT = batch.mask_BT

    def ce() -> float:
        return float(-(learner.compute_logprobs(batch) * mask_BT).sum() / mask_BT.sum())

    start = ce()
    first = learner.sft_step(batch)
    # reported cross-entropy is the unweighted token mean before the step
    assert first.policy_loss == pytest.approx(start, rel=1e-5)
    for _ in range(3):
        learner.sft_step(batch)
    assert ce() < start - 0.1


def test_bad_batch_errors_name_the_record(learner, images):
    batch = train_batch(learner.processor, images, [0.0] * 4)
    batch.image_paths[1] = []  # prompt 1 has one placeholder
    with pytest.raises(
        ValueError, match="sequence 1: prompt has 1 image placeholders but 0 image paths"
    ):
        learner.compute_logprobs(batch)


def test_placeholder_tokens_in_a_completion_are_rejected(learner, images):
    batch = train_batch(learner.processor, images, [0.0] * 4)
    batch.completion_ids[2] = [batch.completion_ids[2][0], learner.processor.image_token_id]
    with pytest.raises(ValueError, match="sequence 2: completion holds token ids"):
        learner.compute_logprobs(batch)


def test_shared_prompt_forward_equals_one_forward_per_sequence(learner, images, tmp_path):
    # GRPO groups: 3 completions per prompt (multi-image, single-image, text-only). Each
    # distinct prompt runs once and its completions on its cached keys / values: the
    # log-probs, the reference's, the loss terms, the gradient and the updated weights
    # must equal those of one whole forward per sequence.
    _step_away_from_init(learner, images, steps=1)
    prompts, image_lists, completions = rl_rows(learner.processor, images)
    tok = learner.processor.tokenizer
    extra = [tok.encode(" Rex"), tok.encode(" no"), tok.encode(" Mia the cat sits at the bottom right")]
    rows = [(p, i, c) for p, i, c0 in zip(prompts[:3], image_lists[:3], completions[:3])
            for c in (c0, *extra[:2])]
    texts, paths, comps = map(list, zip(*rows))
    T = max(len(c) for c in comps)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5, -1.0, 0.4, 0.6])
    learner.save_checkpoint(tmp_path)

    def run(shared: bool):
        learner.cfg.shared_prompt_forward = shared
        try:
            batch = TrainBatch(texts, paths, comps, torch.zeros(len(rows), T), adv.clone())
            mi = learner.build_inputs(texts, paths, comps, shared=shared)
            lp = learner.compute_logprobs(batch)
            ref = learner.compute_ref_logprobs(batch)
            batch.old_logprobs_BT = lp.clone()
            stats = learner.train_step(batch)
            return mi, lp, ref, stats, _lora_params(learner)
        finally:
            learner.load_checkpoint(tmp_path)
            learner.cfg.shared_prompt_forward = True

    mi_s, lp_s, ref_s, st_s, w_s = run(True)
    mi_u, lp_u, ref_u, st_u, w_u = run(False)
    assert mi_s.shared is not None and mi_s.inputs["input_ids"].shape[0] == 3  # 3 distinct prompts
    assert mi_u.shared is None and mi_u.inputs["input_ids"].shape[0] == len(rows)
    torch.testing.assert_close(lp_s, lp_u, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ref_s, ref_u, atol=2e-5, rtol=1e-5)
    assert (lp_s - ref_s).abs().max() > 1e-4  # the adapter is on: not a vacuous comparison
    for field in ("loss", "policy_loss", "kl", "entropy", "grad_norm"):
        torch.testing.assert_close(torch.tensor(getattr(st_s, field)), torch.tensor(getattr(st_u, field)),
                                   rtol=1e-4, atol=1e-7, msg=field)
    assert st_s.grad_norm > 0
    for name in w_s:
        torch.testing.assert_close(w_s[name], w_u[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ptx_term_joins_the_rl_step_and_reports_the_sft_cross_entropy(learner, images, tmp_path):
    # PPO-ptx: one optimizer step on RL loss + coef x SFT cross-entropy. The reported
    # ptx loss is the SFT batch's cross-entropy before the step; the step moves the
    # weights toward the SFT targets more than the RL step alone does.
    batch = _step_away_from_init(learner, images, steps=1)
    sft = sft_batch(learner.processor, images)
    mask_BT = sft.mask_BT
    learner.save_checkpoint(tmp_path)

    def ce() -> float:
        return float(-(learner.compute_logprobs(sft) * mask_BT).sum() / mask_BT.sum())

    def step(ptx, coef):
        try:
            before = ce()
            batch.old_logprobs_BT = learner.compute_logprobs(batch)
            stats = learner.train_step(batch, ptx, coef)
            return before, stats, ce()
        finally:
            learner.load_checkpoint(tmp_path)

    before, plain, after_plain = step(None, 0.0)
    _, mixed, after_mixed = step(sft, 5.0)
    assert plain.ptx_loss != plain.ptx_loss  # NaN: no ptx batch
    assert mixed.ptx_loss == pytest.approx(before, rel=1e-5)
    assert mixed.policy_loss == pytest.approx(plain.policy_loss, rel=1e-5)  # RL terms unchanged
    assert mixed.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert after_mixed < after_plain - 0.05
