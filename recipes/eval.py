"""`repic eval`: caption evaluation splits with a checkpoint, or score a caption result file.

Generate and score (RePIC's evaluation; `repic_ray.evaluation.generate`)::

    repic eval --checkpoint DIR|tiny:qwen2.5-vl [--adapter DIR] --data WORLD_OR_EVAL_DIR
               [--retrieval {skip,topk}] [--top-k K] [--engine vllm|hf] [--ks 1 2 3 4 5]
               [--max-per-k N] [--out DIR] [--method NAME]

captions every query of `concepts_{k}.json` greedily, writes the RePIC result file of
each split, metrics.json (name precision / recall / F1 per k and overall, BLEU-4 /
METEOR / ROUGE-L / CIDEr; SPICE listed as unavailable offline, with the reason) under
`OUT/METHOD/{skip-retrieval,retrieval}/`, and rebuilds `OUT/report.md` (one table row
and one plot line per method and mode found under OUT; recall and F1 by number of
concepts). `--retrieval skip` gives each query the split's own reference images (the
ground-truth concepts plus listed absent ones); `--retrieval topk` retrieves the top-K
concepts of the user's database per query (Grounding DINO crops + CLIP).

Comparing zero-shot / SFT / RL: evaluate each into the same OUT, then read OUT/report.md::

    repic eval --checkpoint tiny:qwen2.5-vl  --method zero-shot --suffix name --data W --out E
    repic eval --checkpoint checkpoints/tiny-sft --method SFT --data W --out E
    repic eval --checkpoint checkpoints/tiny-sft --adapter RUN/adapter --method RL --data W --out E

(the RL row takes the policy the run exported: a merged model directory as
--checkpoint, or the base checkpoint plus its LoRA adapter directory as --adapter).

Score an existing result file (`[image, [concepts], caption, prompt]` records)::

    repic eval --captions results.json [--mode compat] [--json] [--references refs.json]
               [--candidates names.json]

Scores print in percent with one decimal, overall and per number of ground-truth
concepts. `--references` (`{image: [captions]}`) adds the caption metrics. A generated
split re-scores to exactly its metrics.json numbers with `--candidates candidates.json
--references references.json` from its results folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from repic_ray.evaluation.metric import NameEvaluation
from repic_ray.evaluation.scoring import load_references, score_file


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_text(path: str, ev: NameEvaluation | dict, caption: dict | None = None) -> str:
    """Text table of a result file's scores (`ev`: a `NameEvaluation` or `score_file`'s dict)."""
    d = ev.as_dict() if isinstance(ev, NameEvaluation) else ev
    case = "case-sensitive" if d["case_sensitive"] else "case-insensitive"
    lines = [f"{path}: {d['overall']['records']} captions, mode {d['mode']}, {case}"]
    lines.append(f"{'concepts':<9} {'P':>6} {'R':>6} {'F1':>6} {'slots':>6}")
    rows = [("all", d["overall"])] + [
        (k, m) for k, m in sorted(d["by_k"].items(), key=lambda x: int(x[0]))
    ]
    for label, m in rows:
        lines.append(
            f"{label:<9} {_pct(m['precision']):>6} {_pct(m['recall']):>6} {_pct(m['f1']):>6} "
            f"{m['slots']:>6}"
        )
    quality = d["overall"].get("quality")
    if quality is not None:
        lines.append(
            f"repeated 4-grams {quality['rep4']:.3f}, distinct-2 {quality['distinct2']:.3f}, "
            f"mean words {quality['mean_words']:.1f}"
        )
    caption = caption if caption is not None else d.get("caption_metrics")
    if caption is not None:
        for name, value in caption["scores"].items():
            lines.append(f"{name:<9} {_pct(value):>6}")
        for name, reason in caption["unavailable"].items():
            lines.append(f"{name:<9} unavailable: {reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repic eval",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--captions", help="score this RePIC caption result file (JSON)")
    what.add_argument(
        "--checkpoint",
        help="caption the evaluation splits with this model directory, hub id or tiny:qwen2.5-vl",
    )
    p.add_argument(
        "--mode",
        choices=["default", "compat"],
        default="default",
        help="name matching: default (whole-word phrases) or compat (RePIC's scripts)",
    )
    p.add_argument(
        "--references", help="reference captions {image: [captions]} for caption metrics"
    )
    p.add_argument(
        "--candidates", help="JSON list of candidate names (default: all ground-truth names)"
    )
    case = p.add_mutually_exclusive_group()
    case.add_argument("--case-sensitive", dest="case_sensitive", action="store_true", default=None)
    case.add_argument("--ignore-case", dest="case_sensitive", action="store_false")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    g = p.add_argument_group("generation (with --checkpoint)")
    g.add_argument("--adapter", help="peft LoRA adapter directory applied on the checkpoint")
    g.add_argument("--data", help="synthetic world directory or folder of concepts_{k}.json")
    g.add_argument(
        "--database", help="concept database (default: the world's concepts/database.json)"
    )
    g.add_argument(
        "--retrieval",
        choices=["skip", "topk"],
        default="skip",
        help="skip: the split's own references; topk: retrieve from the database",
    )
    g.add_argument("--top-k", type=int, default=5, help="concepts retrieved per query (topk)")
    g.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    g.add_argument(
        "--ks",
        type=int,
        nargs="+",
        help="numbers of concepts per query to evaluate (default: every split found)",
    )
    g.add_argument("--max-per-k", type=int, help="evaluate the first N queries of each split")
    g.add_argument("--out", default="eval_results", help="results root (default eval_results)")
    g.add_argument(
        "--method", default="", help="row label and results folder (default: the checkpoint's name)"
    )
    g.add_argument(
        "--suffix",
        choices=["none", "name", "random", "bare"],
        default="none",
        help="question suffix: none (RePIC's own model) or name (zero-shot baselines)",
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument(
        "--name-candidates",
        choices=["database", "ground_truth"],
        default="database",
        help="names looked for: the whole database or the ground truth (RePIC)",
    )
    g.add_argument(
        "--no-caption-metrics",
        action="store_true",
        help="skip BLEU / METEOR / ROUGE-L / CIDEr (they start Java)",
    )
    return p


def generate_main(args: argparse.Namespace) -> int:
    """`repic eval --checkpoint ...`: run the evaluation, rebuild OUT/report.md."""
    from repic_ray.evaluation.generate import EvalConfig, run_eval
    from repic_ray.evaluation.report import write_results_report

    if not args.data:
        raise ValueError("--data: required with --checkpoint (a world or evaluation directory)")
    cfg = EvalConfig(
        checkpoint=args.checkpoint,
        adapter=args.adapter,
        data=args.data,
        database=args.database,
        retrieval=args.retrieval,
        top_k=args.top_k,
        ks=args.ks,
        max_per_k=args.max_per_k,
        engine=args.engine,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        suffix=args.suffix,
        candidates=args.name_candidates,
        name_mode=args.mode,
        caption_metrics=not args.no_caption_metrics,
        method=args.method,
        out=args.out,
    )
    metrics = run_eval(cfg)
    report = write_results_report(cfg.out)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        scores = {**metrics["name_metric"], "overall": metrics["overall"], "by_k": metrics["by_k"]}
        print(format_text(str(cfg.out_dir()), scores, metrics["overall"]["caption_metrics"]))
        print(f"results: {cfg.out_dir()}\nreport: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.checkpoint is not None:
        return generate_main(args)
    candidates = None
    if args.candidates:
        candidates = json.loads(Path(args.candidates).read_text(encoding="utf-8"))
        if candidates is not None and (
            not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates)
        ):
            raise ValueError(f"{args.candidates}: expected a JSON list of names (or null)")
    refs = load_references(args.references) if args.references else None
    try:
        scores = score_file(
            args.captions,
            mode=args.mode,
            candidates=candidates,
            case_sensitive=args.case_sensitive,
            references=refs,
        )
    except ValueError as exc:
        if refs is not None and "no references for image" in str(exc):
            raise ValueError(f"{args.references}: {exc}") from exc
        raise
    if args.json:
        print(json.dumps({"captions": args.captions, **scores}, indent=2))
    else:
        print(format_text(args.captions, scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
