"""Compare methods (e.g. zero-shot / SFT / RL): a markdown table and recall-by-#concepts plots.

    python -m repic_ray.evaluation.report --method zero-shot=zs.json --method RL=rl.json --out report/

writes `report/report.md` (P / R / F1 overall and per number of concepts, in
percent) and `report/recall_by_k.png` / `report/f1_by_k.png`.

    python -m repic_ray.evaluation.report --results eval_results/

combines every `repic eval --checkpoint` run found under `eval_results/`
(`METHOD/MODE/metrics.json`) into `eval_results/report.md`: one row and one plot
line per method and retrieval mode, with caption metrics and retrieval recall.
`repic eval --checkpoint` rebuilds that report after each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repic_ray.evaluation.metric import NameEvaluation
from repic_ray.evaluation.scoring import evaluate_file


def evaluate_methods(
    files: Mapping[str, str | Path], *, mode: str = "default", case_sensitive: bool | None = None
) -> dict[str, NameEvaluation]:
    """Method name -> evaluation of its result file."""
    return {m: evaluate_file(p, mode=mode, case_sensitive=case_sensitive) for m, p in files.items()}


def markdown_table(evals: Mapping[str, NameEvaluation]) -> str:
    """One row per method: overall P / R / F1 then recall per number of concepts (percent)."""
    ks = sorted({k for ev in evals.values() for k in ev.by_k})
    head = ["method", "P", "R", "F1", *[f"R@{k}" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, ev in evals.items():
        o = ev.overall
        cells = [method, *(f"{100 * v:.1f}" for v in (o.precision, o.recall, o.f1))]
        cells += [f"{100 * ev.by_k[k].recall:.1f}" if k in ev.by_k else "–" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_by_k(
    evals: Mapping[str, NameEvaluation], out_path: str | Path, metric: str = "recall"
) -> Path:
    """Line plot of `metric` (recall / precision / f1, percent) against number of concepts per method."""
    series = {
        method: {k: getattr(m, metric) for k, m in ev.by_k.items()} for method, ev in evals.items()
    }
    return _plot_series(series, out_path, metric)


def _plot_series(
    series: Mapping[str, Mapping[int, float]], out_path: str | Path, metric: str
) -> Path:
    """One line per label: value (fraction, drawn in percent) against number of concepts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in series.items():
        ks = sorted(values)
        ax.plot(ks, [100 * values[k] for k in ks], marker="o", label=label)
    ax.set_xlabel("concepts in the image")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def write_report(
    files: Mapping[str, str | Path], out_dir: str | Path, *, mode: str = "default"
) -> Path:
    """Evaluate every method, write report.md and the plots into `out_dir`; return report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = evaluate_methods(files, mode=mode)
    plot_by_k(evals, out_dir / "recall_by_k.png", "recall")
    plot_by_k(evals, out_dir / "f1_by_k.png", "f1")
    text = (
        f"# Personalized captioning: name precision / recall (mode {mode})\n\n"
        + markdown_table(evals)
        + "\n\n![recall by number of concepts](recall_by_k.png)\n"
        + "![F1 by number of concepts](f1_by_k.png)\n"
    )
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# Reports of `repic eval --checkpoint` runs (metrics.json files)

CAPTION_COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class EvalRun:
    """One evaluated method in one retrieval mode, as its metrics.json records it."""

    method: str
    mode: str
    """"skip-retrieval" or "retrieval"."""
    metrics: dict[str, Any]
    path: Path

    @property
    def label(self) -> str:
        return f"{self.method} ({self.mode})"


def load_eval_run(path: str | Path) -> EvalRun:
    """A metrics.json written by `repic_ray.evaluation.generate.write_results`."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read evaluation metrics: {exc}") from exc
    for key in ("overall", "by_k"):
        if not isinstance(metrics, dict) or not isinstance(metrics.get(key), dict):
            raise ValueError(  # noqa: TRY004
                f"{path}: field {key!r} missing; not a `repic eval` metrics.json"
            )
    settings = metrics.get("settings", {})
    method = settings.get("method") or path.parent.parent.name
    mode = settings.get("mode") or path.parent.name
    return EvalRun(method, mode, metrics, path)


def find_eval_runs(root: str | Path) -> list[EvalRun]:
    """Every `METHOD/MODE/metrics.json` under `root`, sorted by method then mode."""
    runs = [load_eval_run(p) for p in sorted(Path(root).glob("*/*/metrics.json"))]
    return sorted(runs, key=lambda r: (r.method, r.mode))


def results_table(runs: Sequence[EvalRun]) -> str:
    """One row per run: P / R / F1 overall, recall per k, caption metrics (percent),
    repeated-4-gram rate and mean words, and retrieval recall in retrieval mode."""
    ks = sorted({int(k) for r in runs for k in r.metrics["by_k"]})
    head = [
        "method",
        "mode",
        "P",
        "R",
        "F1",
        *[f"R@{k}" for k in ks],
        *CAPTION_COLUMNS,
        "rep-4gram",
        "words",
        "retrieval R",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        o, by_k = r.metrics["overall"], r.metrics["by_k"]
        cells = [r.method, r.mode, *(f"{100 * o[m]:.1f}" for m in ("precision", "recall", "f1"))]
        cells += [f"{100 * by_k[str(k)]['recall']:.1f}" if str(k) in by_k else "–" for k in ks]
        scores = (o.get("caption_metrics") or {}).get("scores", {})
        cells += [f"{100 * scores[c]:.1f}" if c in scores else "–" for c in CAPTION_COLUMNS]
        quality = o.get("quality") or {}
        cells += [f"{quality['rep4']:.3f}" if quality else "–", f"{quality['mean_words']:.1f}" if quality else "–"]
        retrieval = r.metrics.get("retrieval")
        cells.append(f"{100 * retrieval['recall']:.1f}" if retrieval else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """report.md, recall_by_k.png and f1_by_k.png over every run under `root`."""
    runs = find_eval_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no METHOD/MODE/metrics.json found")
    out_dir = Path(out_dir if out_dir is not None else root)
    out_dir.mkdir(parents=True, exist_ok=True)
    for metric in ("recall", "f1"):
        series = {r.label: {int(k): m[metric] for k, m in r.metrics["by_k"].items()} for r in runs}
        _plot_series(series, out_dir / f"{metric}_by_k.png", metric)
    unavailable: dict[str, str] = {}
    for r in runs:
        unavailable.update(
            (r.metrics["overall"].get("caption_metrics") or {}).get("unavailable", {})
        )
    name_mode = runs[0].metrics.get("name_metric", {}).get("mode", "default")
    text = (
        f"# Personalized captioning: name precision / recall (mode {name_mode})\n\n"
        "Percent. P / R / F1 and caption metrics over all splits; R@k: recall on queries "
        "with k concepts; rep-4gram: share of a caption's word 4-grams that repeat (0-1); "
        "words: mean caption length; retrieval R: ground-truth concepts among the retrieved ones.\n\n"
        + results_table(runs)
        + "\n\n"
        + "".join(f"{name} unavailable: {why}\n\n" for name, why in sorted(unavailable.items()))
        + "![recall by number of concepts](recall_by_k.png)\n"
        + "![F1 by number of concepts](f1_by_k.png)\n"
    )
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="repic report", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--method",
        action="append",
        metavar="NAME=FILE",
        help="a method and its caption result file; repeat per method",
    )
    what.add_argument(
        "--results", help="a `repic eval --checkpoint` results root (METHOD/MODE/metrics.json)"
    )
    p.add_argument("--out", help="output directory (default: the --results root)")
    p.add_argument("--mode", choices=["default", "compat"], default="default")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.results:
        print(write_results_report(args.results, args.out))
        return 0
    if not args.out:
        p.error("--out: required with --method")
    files = {}
    for item in args.method:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--method: expected NAME=FILE, got {item!r}")
        files[name] = path
    print(write_report(files, args.out, mode=args.mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
