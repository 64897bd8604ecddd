"""End-to-end `repic eval --checkpoint` on the tiny Qwen2.5-VL (repic_ray/evaluation/generate.py
through repic_ray/evaluation/cli.py): both retrieval modes, an adapter, the combined report,
and the vLLM engine against the HF engine."""

from __future__ import annotations

import json

import pytest

from recipes.eval import main
from repic_ray.data.formats import load_captions, load_samples
from repic_ray.evaluation.generate import EvalConfig, build_engine, run_eval


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A peft LoRA adapter on the tiny model's language model, with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from repic_ray.models.loading import load_policy

    model = load_policy("tiny:qwen2.5-vl")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    out = tmp_path_factory.mktemp("adapter") / "rl-adapter"
    peft_model.save_pretrained(out)
    return out


def scores_of(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_skip_retrieval_files_metrics_and_caption_scores_recompute(world, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = scores_of(
        capsys,
        [
            "eval",
            "--checkpoint",
            "tiny:qwen2.5-vl",
            "--data",
            str(world),
            "--engine",
            "hf",
            "--ks",
            "1",
            "2",
            "--max-tokens",
            "12",
            "--out",
            str(out),
            "--method",
            "zero-shot",
            "--suffix",
            "name",
            "--json",
        ],
    )
    run = out / "zero-shot" / "skip-retrieval"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    # One record per query of each split, with the split's ground truth and references.
    for k in (1, 2):
        split = load_samples(world / "eval" / f"concepts_{k}.json")
        records = load_captions(run / f"captions_k{k}.json")
        assert [r.image for r in records] == [s.query_image for s in split]
        assert [r.concepts for r in records] == [s.concepts for s in split]
        for r, s in zip(records, split):
            assert [f"This is <{n}>." in r.prompt for n in s.ref_names] == [True] * len(s.ref_names)
            assert r.prompt.count("<|image_pad|>") == len(s.images)
            assert "Output the final answer including its name." in r.prompt
    assert set(metrics["by_k"]) == {"1", "2"}
    assert metrics["by_k"]["2"]["slots"] == 4 and metrics["overall"]["slots"] == 6
    caption = metrics["overall"]["caption_metrics"]
    assert set(caption["scores"]) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert "SPICE" in caption["unavailable"]
    assert metrics["by_k"]["1"]["caption_metrics"]["scores"].keys() == caption["scores"].keys()

    # `repic eval --captions` on the written file reproduces every number exactly.
    printed = scores_of(
        capsys,
        [
            "--captions",
            str(run / "captions_all.json"),
            "--candidates",
            str(run / "candidates.json"),
            "--references",
            str(run / "references.json"),
            "--json",
        ],
    )
    assert (
        printed["overall"] | {"caption_metrics": printed["caption_metrics"]} == metrics["overall"]
    )
    for k in ("1", "2"):
        printed = scores_of(
            capsys,
            [
                "--captions",
                str(run / f"captions_k{k}.json"),
                "--candidates",
                str(run / "candidates.json"),
                "--json",
            ],
        )
        expected = {n: v for n, v in metrics["by_k"][k].items() if n != "caption_metrics"}
        assert printed["overall"] == expected
    report = (out / "report.md").read_text()
    assert "| zero-shot | skip-retrieval |" in report and "SPICE unavailable" in report


def test_retrieval_with_adapter_and_the_combined_report(world, adapter_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    common = [
        "--data",
        str(world),
        "--engine",
        "hf",
        "--ks",
        "1",
        "3",
        "--max-tokens",
        "8",
        "--out",
        str(out),
        "--no-caption-metrics",
        "--json",
    ]
    scores_of(capsys, ["--checkpoint", "tiny:qwen2.5-vl", "--method", "zero-shot", *common])
    metrics = scores_of(
        capsys,
        [
            "--checkpoint",
            "tiny:qwen2.5-vl",
            "--adapter",
            str(adapter_dir),
            "--method",
            "RL",
            "--retrieval",
            "topk",
            "--top-k",
            "2",
            *common,
        ],
    )
    run = out / "RL" / "retrieval"
    assert metrics["settings"]["adapter"] == str(adapter_dir)
    for k in (1, 3):
        split = load_samples(world / "eval" / f"concepts_{k}.json")
        records = load_captions(run / f"captions_k{k}.json")
        retrieved = json.loads((run / f"retrieved_k{k}.json").read_text())
        assert [r.image for r in records] == [s.query_image for s in split]
        assert [r.concepts for r in records] == [s.concepts for s in split]
        for r, found in zip(records, retrieved):
            # Exactly the 2 retrieved concepts (one reference image each) and the query.
            assert len(found["retrieved"]) == 2
            assert [f"This is <{n}>." in r.prompt for n in found["retrieved"]] == [True, True]
            assert r.prompt.count("This is <") == 2 and r.prompt.count("<|image_pad|>") == 3
        printed = scores_of(
            capsys,
            [
                "--captions",
                str(run / f"captions_k{k}.json"),
                "--candidates",
                str(run / "candidates.json"),
                "--json",
            ],
        )
        expected = {n: v for n, v in metrics["by_k"][str(k)].items() if n != "caption_metrics"}
        assert printed["overall"] == expected
    # Retrieval recall: ground-truth concepts among the 2 retrieved, recounted by hand.
    rows = [row for k in (1, 3) for row in json.loads((run / f"retrieved_k{k}.json").read_text())]
    hits = sum(c in row["retrieved"] for row in rows for c in row["concepts"])
    assert metrics["retrieval"]["recall"] == pytest.approx(hits / 8)  # 2 x 1 + 2 x 3 slots

    # Both methods and modes land in one table and one plot.
    report = (out / "report.md").read_text()
    assert "| RL | retrieval |" in report and "| zero-shot | skip-retrieval |" in report
    assert "R@1 | R@3 |" in report
    assert (out / "recall_by_k.png").read_bytes()[:4] == b"\x89PNG"

    # The adapter is really applied to the engine.
    cfg = EvalConfig(data=str(world), engine="hf", adapter=str(adapter_dir))
    engine = build_engine(cfg, max_images=3)
    assert engine.policy_version == 1 and engine.model is not engine.base_model


@pytest.mark.slow
def test_vllm_engine_gives_the_hf_engine_captions(world, tmp_path, tiny_qwen_dir, vllm_tiny_engine):
    """fp32 greedy decoding: vLLM and transformers pick the same tokens for every prompt,
    and each written caption is its engine's text of them. (The texts themselves may differ
    where a random token sequence is not valid UTF-8: vLLM's incremental detokenizer holds
    back an incomplete character that transformers' decode shows as U+FFFD.)"""
    from repic_ray.evaluation.generate import skip_retrieval_prompts
    from repic_ray.models.loading import load_processor
    from repic_ray.rollout.config import RolloutConfig, SamplingConfig
    from repic_ray.rollout.types import RolloutRequest
    from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

    mode = vllm_tiny_engine.llm_engine.model_config.logprobs_mode
    vllm = VLLMRolloutEngine(
        RolloutConfig(
            model=str(tiny_qwen_dir), dtype="float32", logprobs_mode=mode, enable_lora=False
        ),
        llm=vllm_tiny_engine,
    )
    split = load_samples(world / "eval" / "concepts_2.json")
    uids = [f"k2:{i}" for i in range(len(split))]
    prompts = skip_retrieval_prompts(
        split, load_processor("tiny:qwen2.5-vl"), suffix="none", seed=0, uids=uids
    )
    requests = [
        RolloutRequest(uid=u, prompt_text=p.text, image_paths=list(p.image_paths), n=1)
        for u, p in zip(uids, prompts)
    ]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    for name, engine in (("vllm", vllm), ("hf", None)):
        cfg = EvalConfig(
            data=str(world),
            ks=[2],
            engine="hf",
            dtype="float32",
            max_tokens=16,
            caption_metrics=False,
            method=name,
            out=str(tmp_path),
        )
        run_eval(cfg, engine=engine)
        engine = engine or build_engine(cfg, max_images=5)
        completions = [r.completions[0] for r in engine.generate(requests, greedy)]
        written = [r.caption for r in load_captions(cfg.out_dir() / "captions_k2.json")]
        assert written == [c.text.strip() for c in completions]
        if name == "vllm":
            vllm_tokens = [c.token_ids for c in completions]
        else:
            assert [c.token_ids for c in completions] == vllm_tokens
    vllm.close()
