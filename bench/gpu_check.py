"""The GPU check: what a CPU machine cannot prove about the CUDA path, in one script.

    PYTHONPATH=. python3 bench/gpu_check.py            # from the repository root
    OUT=/some/dir PYTHONPATH=. python3 bench/gpu_check.py   # also writes $OUT/gpu_check.json
    PYTHONPATH=. python3 bench/gpu_check.py --cpu      # smoke test of the tiny checks on CPU
    ... --no-deepspeed                                  # learner steps with peft + torch AdamW

Needs torch (CUDA), transformers, tokenizers, peft and Pillow; uses DeepSpeed when it is
installed and says so when not; never imports Ray or vLLM (they are not needed here and
are too big to carry to a bare GPU machine). Under 10 minutes on one H100.

Checks, each reported as ok / FAILED / skipped (with the reason):
1. tiny model, CUDA: HF `generate` (sampling, the vision special tokens suppressed as the
   rollout engines do) and a teacher-forced forward agree on the sampled tokens' log-probs
   (fp32 within 1e-3, bf16 within 2e-2); two LoRA learner steps (DeepSpeed ZeRO-2 through
   `LearnerEngine` if DeepSpeed is present, else peft + torch AdamW) move the policy.
2. shape-faithful Qwen2.5-VL-7B (`tiny:qwen2.5-vl-7b-shapes`: the 7B's widths, vocabulary
   and vision tower, 2 language layers, ~1.6 B parameters), bf16: the same log-prob
   parity, then 2 GRPO-shaped LoRA r=64 steps with gradient checkpointing at the 7B
   recipe's micro-batch of 2; peak GPU memory of the learner step against `repic plan`'s
   estimate for the same shapes.
Not run here (no package on the GPU machine): vLLM rollout (bf16 vLLM vs learner
log-probs), Ray placement, `repic serve` — the CPU run `bench/shape_7b_check.py` covers
those code paths on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from PIL import Image, ImageDraw

TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS: dict = {"checks": {}, "skipped": {}}
DEVICE = "cuda"  # `--cpu` runs the tiny checks on CPU (a smoke test of this script itself)


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check(name: str):
    """Run the decorated check, record ok / failed with its numbers or traceback."""

    def wrap(fn):
        t0 = time.time()
        print(f"\n=== {name}", flush=True)
        try:
            out = fn() or {}
            ok = bool(out.pop("ok", True))
            RESULTS["checks"][name] = {"status": "ok" if ok else "FAILED", **out}
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the next check runs
            traceback.print_exc()
            RESULTS["checks"][name] = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}"}
        RESULTS["checks"][name]["seconds"] = round(time.time() - t0, 1)
        print(f"--- {name}: {json.dumps(RESULTS['checks'][name])}", flush=True)
        return fn

    return wrap


def skip(name: str, why: str) -> None:
    RESULTS["skipped"][name] = why
    print(f"\n=== {name}: skipped ({why})", flush=True)


# ------------------------------------------------------------------------------ prompts


def write_images(root: Path) -> list[str]:
    """Two 56-px references and a 112-px query (two objects), as RePIC prompts have."""
    paths = []
    for name, size, shapes in (("ref_bo", 56, [((8, 8, 48, 48), (220, 40, 40))]),
                               ("ref_mo", 56, [((8, 8, 48, 48), (40, 80, 220))]),
                               ("query", 112, [((6, 6, 50, 50), (220, 40, 40)), ((60, 60, 106, 106), (40, 80, 220))])):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        for box, colour in shapes:
            ImageDraw.Draw(image).ellipse(box, fill=colour)
        path = root / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def render_prompt(processor, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": "This is <Bo>.\n"},
               {"type": "image"}, {"type": "text", "text": "This is <Mo>.\n"},
               {"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


QUESTIONS = ["Give a personalized caption of the image.", "Is <Bo> in this image? Answer yes or no."]


# ---------------------------------------------------------------------- shared checks


def learner_functions():
    """The learner's completion-only forward and log-prob functions; `repic_ray.learner`
    imports DeepSpeed, so without it the same few lines are used from here."""
    try:
        from repic_ray.learner.engine import completion_hidden_states, token_logprobs

        return completion_hidden_states, token_logprobs
    except ImportError:
        pass

    def completion_hidden_states(hf_model, inputs, positions_BT):
        hf_model.model.rope_deltas = None
        h_BLH = hf_model.model(**inputs, use_cache=False, return_dict=True).last_hidden_state
        return torch.gather(h_BLH, 1, positions_BT[:, :, None].expand(-1, -1, h_BLH.shape[-1]))

    def token_logprobs(logits_BTV, targets_BT, mask_BT):
        logp_BT = torch.log_softmax(logits_BTV.float(), -1).gather(-1, targets_BT[..., None]).squeeze(-1)
        return torch.where(mask_BT.bool(), logp_BT, torch.zeros((), device=logp_BT.device))

    return completion_hidden_states, token_logprobs


def generate_and_parity(spec: str, dtype: str, images: list[str], max_new_tokens: int, samples: int):
    """Sample with HF `generate` on CUDA, then recompute the sampled tokens' log-probs with a
    teacher-forced forward (the learner's way: only completion positions, M-RoPE inputs).
    Returns (rows for a TrainBatch, generate log-probs, max/mean |diff|)."""
    from repic_ray.models.loading import (
        load_policy,
        load_processor,
        qwen_mm_inputs,
        vision_special_token_ids,
    )

    completion_hidden_states, token_logprobs = learner_functions()
    processor = load_processor(spec)
    model = load_policy(spec, dtype=DTYPES[dtype], device=DEVICE)
    blocked = vision_special_token_ids(processor.tokenizer)
    pil = [Image.open(p).convert("RGB") for p in images]
    rows, gen_lps, diffs = [], [], []
    torch.manual_seed(0)
    for question in QUESTIONS:
        prompt = render_prompt(processor, question)
        inputs = {k: v.to(DEVICE) for k, v in qwen_mm_inputs(processor, prompt, pil).items()}
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 suppress_tokens=blocked, output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=None, min_new_tokens=max_new_tokens)
        n_prompt = inputs["input_ids"].shape[1]
        seqs = out.sequences[:, n_prompt:]
        logits = torch.stack(out.logits, 1).float()  # raw logits, [S, T, V]
        logits[..., blocked] = -torch.inf
        gen_lp = torch.log_softmax(logits, -1).gather(-1, seqs[..., None]).squeeze(-1)
        for s in range(samples):
            ids = seqs[s].tolist()
            full = torch.cat([inputs["input_ids"][0], seqs[s]])[None]
            fwd = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
            fwd["input_ids"] = full
            fwd["attention_mask"] = torch.ones_like(full)
            fwd["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"][0], torch.zeros_like(seqs[s])])[None]
            positions = torch.arange(n_prompt - 1, n_prompt - 1 + len(ids), device=DEVICE)[None]
            with torch.no_grad():
                h = completion_hidden_states(model, fwd, positions)
                lg = model.lm_head(h).float()
                lg[..., blocked] = -torch.inf
                tf_lp = token_logprobs(lg, seqs[s][None], torch.ones_like(seqs[s])[None])[0]
            diffs.append((tf_lp - gen_lp[s]).abs())
            rows.append((prompt, ids))
            gen_lps.append(gen_lp[s].cpu())
    diff = torch.cat(diffs)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows, gen_lps, float(diff.max()), float(diff.mean())


def learner_steps(spec: str, dtype: str, images: list[str], rows, gen_lps, lora_r: int, micro: int,
                  checkpointing: bool) -> dict:
    """Two GRPO-shaped LoRA updates on the sampled rows; DeepSpeed ZeRO-2 via LearnerEngine
    when DeepSpeed is installed, else peft + torch AdamW. Peak memory of the update."""
    advantages = torch.tensor([1.0, -1.0] * (len(rows) // 2))
    if has("deepspeed") and "--no-deepspeed" not in sys.argv[1:]:
        try:
            return deepspeed_steps(spec, dtype, images, rows, gen_lps, advantages, lora_r, micro, checkpointing)
        except Exception as exc:  # noqa: BLE001 - reported, then the peft path still measures the step
            traceback.print_exc()
            out = peft_steps(spec, dtype, images, rows, advantages, lora_r, micro, checkpointing)
            return {**out, "ok": False, "deepspeed_error": f"{type(exc).__name__}: {exc}"}
    return peft_steps(spec, dtype, images, rows, advantages, lora_r, micro, checkpointing)


def deepspeed_steps(spec, dtype, images, rows, gen_lps, advantages, lora_r, micro, checkpointing) -> dict:
    """The steps through the project's `LearnerEngine` (DeepSpeed ZeRO-2)."""
    from repic_ray.learner import LearnerEngine, LoraConfig, LossConfig, TrainBatch
    from repic_ray.learner.config import LearnerConfig
    from repic_ray.ports import free_port

    cfg = LearnerConfig(model=spec, dtype=dtype, zero_stage=2, lr=1e-5 if lora_r == 64 else 1e-3,
                        micro_batch_size=micro, gradient_checkpointing=checkpointing,
                        lora=LoraConfig(r=lora_r, alpha=2.0 * lora_r, dropout=0.05),
                        loss=LossConfig(kl_beta=0.04))
    learner = LearnerEngine(cfg, master_port=free_port())
    try:
        T = max(len(ids) for _, ids in rows)
        old = torch.zeros(len(rows), T)
        for i, lp in enumerate(gen_lps):
            old[i, : len(lp)] = lp
        batch = TrainBatch(prompt_texts=[p for p, _ in rows], image_paths=[images] * len(rows),
                           completion_ids=[ids for _, ids in rows], old_logprobs_BT=old,
                           advantages_BT=advantages)
        learner_lp = learner.compute_logprobs(batch)
        mask = learner_lp != 0
        mismatch = float((learner_lp - old).abs()[mask].mean())
        batch.old_logprobs_BT = learner_lp
        reset_peak()
        t0 = time.time()
        stats = [learner.train_step(batch) for _ in range(2)]
        step_s = (time.time() - t0) / 2
        peak = peak_gib()
        after = learner.compute_logprobs(batch)
        moved = float((after - learner_lp).abs()[mask].mean())
    finally:
        learner.close()
    return {"engine": "DeepSpeed ZeRO-2 (LearnerEngine)", "learner_vs_generate_mismatch": mismatch,
            "losses": [s.loss for s in stats], "grad_norms": [s.grad_norm for s in stats],
            "policy_moved": moved, "step_s": round(step_s, 2), "peak_gib": peak,
            "ok": moved > 0 and all(torch.isfinite(torch.tensor(s.grad_norm)) for s in stats)}


def peft_steps(spec, dtype, images, rows, advantages, lora_r, micro, checkpointing) -> dict:
    from peft import LoraConfig, get_peft_model

    from repic_ray.models.loading import load_policy, load_processor, qwen_mm_inputs

    completion_hidden_states, token_logprobs = learner_functions()
    LM_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    processor = load_processor(spec)
    model = load_policy(spec, dtype=DTYPES[dtype], device=DEVICE)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules=LM_LORA_TARGET))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5 if lora_r == 64 else 1e-3)
    pil = [Image.open(p).convert("RGB") for p in images]

    def logprobs(i: int) -> torch.Tensor:
        prompt, ids = rows[i]
        enc = qwen_mm_inputs(processor, prompt, pil)
        n = enc["input_ids"].shape[1]
        comp = torch.tensor(ids)
        enc["input_ids"] = torch.cat([enc["input_ids"][0], comp])[None]
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(comp)])[None]
        enc = {k: v.to(DEVICE) for k, v in enc.items()}
        pos = torch.arange(n - 1, n - 1 + len(ids), device=DEVICE)[None]
        h = completion_hidden_states(model.base_model.model, enc, pos)
        lg = model.base_model.model.lm_head(h)
        return token_logprobs(lg, comp[None].to(DEVICE), torch.ones_like(comp)[None].to(DEVICE))[0]

    reset_peak()
    losses, t0 = [], time.time()
    with torch.no_grad():
        before = [logprobs(i) for i in range(len(rows))]
    for _ in range(2):
        opt.zero_grad()
        total = 0.0
        for start in range(0, len(rows), micro):
            for i in range(start, min(start + micro, len(rows))):
                lp = logprobs(i)
                loss = -(advantages[i] * torch.exp(lp - lp.detach())).mean() / len(rows)
                loss.backward()
                total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(total)
    step_s = (time.time() - t0) / 2
    peak = peak_gib()
    with torch.no_grad():
        moved = float(torch.cat([(logprobs(i) - before[i]).abs() for i in range(len(rows))]).mean())
    model = opt = None  # free the GPU memory before the next check
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"engine": "peft + torch AdamW", "losses": losses, "policy_moved": moved,
            "step_s": round(step_s, 2), "peak_gib": peak, "ok": moved > 0}


def planned_learner_gib(spec: str, micro: int, seq_len: int, completion: int, lora_r: int) -> dict:
    """`repic plan`'s learner numbers for this model and batch shape (one rank, ZeRO-2, bf16)."""
    from repic_ray.plan import activation_bytes, model_states_bytes, resolve_arch

    arch = resolve_arch(spec)
    states = model_states_bytes(arch.lora_params(lora_r), arch.total_params(), 2, 1, "bf16")
    acts = activation_bytes(arch, micro, seq_len, completion, "bf16", True, True)
    parts = {**states, **acts}
    return {**{k: round(v / 2**30, 3) for k, v in parts.items()}, "total": round(sum(parts.values()) / 2**30, 2)}


# ---------------------------------------------------------------------------------- main


def main() -> int:
    global DEVICE
    if "--cpu" in sys.argv[1:]:
        DEVICE = "cpu"
    out_dir = os.environ.get("OUT")
    RESULTS["env"] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **{pkg: has(pkg) for pkg in ("transformers", "peft", "deepspeed", "vllm", "ray")},
    }
    import transformers

    RESULTS["env"]["transformers"] = transformers.__version__
    print(json.dumps(RESULTS["env"], indent=1), flush=True)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--cpu runs the tiny checks on CPU)", file=sys.stderr)
        return 2
    skip("vLLM rollout + learner-vs-vLLM log-probs", "vllm is not installed on this machine" if not has("vllm")
         else "not part of this script (run bench/shape_7b_check.py with GPU settings)")
    skip("Ray placement / repic train / repic serve", "ray is not installed on this machine" if not has("ray")
         else "not part of this script")
    if not has("deepspeed") or "--no-deepspeed" in sys.argv[1:]:
        why = "not installed" if not has("deepspeed") else "--no-deepspeed"
        skip("DeepSpeed ZeRO-2 learner", f"deepspeed {why}: learner steps use peft + torch AdamW")
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    images = write_images(root)
    t_start = time.time()

    for dtype in ("fp32", "bf16"):
        @check(f"tiny {dtype}: generate vs teacher-forced log-probs, 2 LoRA steps")
        def _tiny(dtype=dtype):
            rows, lps, mx, mean = generate_and_parity("tiny:qwen2.5-vl", dtype, images, 24, 2)
            steps = learner_steps("tiny:qwen2.5-vl", dtype, images, rows, lps, 8, 2, False)
            ok = mean <= TOLERANCE[dtype] and steps.pop("ok")
            return {"parity_max": mx, "parity_mean": mean, "tolerance": TOLERANCE[dtype], **steps, "ok": ok}

    if DEVICE == "cpu":
        skip("shape-faithful 7B", "--cpu: tiny checks only")
    else:
        shape_check(images)
    RESULTS["total_s"] = round(time.time() - t_start, 1)
    failed = [k for k, v in RESULTS["checks"].items() if v["status"] != "ok"]
    RESULTS["result"] = "PASS" if not failed else f"FAIL ({len(failed)} checks)"
    print("\n" + json.dumps(RESULTS, indent=1))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    return 0 if not failed else 1


def shape_check(images: list[str]) -> None:
    @check("shape-faithful 7B bf16: build, generate vs teacher-forced log-probs, 2 LoRA r=64 steps, memory")
    def _shapes():
        from repic_ray.models.loading import resolve_checkpoint

        t0 = time.time()
        path = resolve_checkpoint("tiny:qwen2.5-vl-7b-shapes")
        build_s = time.time() - t0
        rows, lps, mx, mean = generate_and_parity("tiny:qwen2.5-vl-7b-shapes", "bf16", images, 64, 2)
        steps = learner_steps("tiny:qwen2.5-vl-7b-shapes", "bf16", images, rows, lps, 64, 2, True)
        from repic_ray.models.loading import load_processor, qwen_mm_inputs

        processor = load_processor("tiny:qwen2.5-vl-7b-shapes")
        pil = [Image.open(p).convert("RGB") for p in images]
        seq = max(qwen_mm_inputs(processor, p, pil)["input_ids"].shape[1] + len(ids) for p, ids in rows)
        plan = planned_learner_gib("tiny:qwen2.5-vl-7b-shapes", 2, seq, 64, 64)
        ok = mean <= TOLERANCE["bf16"] and steps.pop("ok")
        return {"checkpoint": str(path), "build_s": round(build_s, 1), "parity_max": mx, "parity_mean": mean,
                "tolerance": TOLERANCE["bf16"], **steps, "seq_len": seq, "plan_learner_gib": plan,
                "measured_over_plan": round(steps["peak_gib"] / plan["total"], 2) if steps["peak_gib"] else None,
                "ok": ok}


if __name__ == "__main__":
    sys.exit(main())
