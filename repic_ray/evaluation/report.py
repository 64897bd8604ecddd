"""Compare methods (e.g. zero-shot / SFT / RL): a markdown table and recall-by-#concepts plots.

    python -m repic_ray.evaluation.report --method zero-shot=zs.json --method RL=rl.json --out report/

writes `report/report.md` (P / R / F1 overall and per number of concepts, in
percent) and `report/recall_by_k.png` / `report/f1_by_k.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from repic_ray.evaluation.cli import evaluate_file
from repic_ray.evaluation.metric import NameEvaluation


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, ev in evals.items():
        ks = sorted(ev.by_k)
        ax.plot(ks, [100 * getattr(ev.by_k[k], metric) for k in ks], marker="o", label=method)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="repic report", description=__doc__.split("\n")[0])
    p.add_argument(
        "--method",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a method and its caption result file; repeat per method",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=["default", "compat"], default="default")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
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
