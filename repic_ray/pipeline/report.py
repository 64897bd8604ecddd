"""The run report: before/after evaluation table and training curves.

Writes `{out}/report.md` (markdown tables of precision / recall / F1 per concept
count, before and after RL), `{out}/curves.png` (reward, KL and response length
per step) and `{out}/eval_curves.png` (precision / recall / F1 per evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _splits(ev: dict[str, Any]) -> list[str]:
    """The split keys (`k1`, `k2`, ...) of one evaluation, by concept count."""
    return sorted((k for k in ev if k[:1] == "k" and k[1:].isdigit()), key=lambda s: int(s[1:]))


def eval_table(evals: dict[str, dict[str, Any]]) -> str:
    """Rows per evaluation tag, columns P / R / F1 per split k."""
    if not evals:
        return "_no evaluation splits_\n"
    ks = sorted({k for ev in evals.values() for k in _splits(ev)}, key=lambda s: int(s[1:]))
    head = "| eval | " + " | ".join(f"{k} P / R / F1" for k in ks) + " |"
    sep = "|---|" + "---|" * len(ks)
    rows = []
    for tag, ev in evals.items():
        cells = []
        for k in ks:
            m = ev.get(k)
            cells.append(f"{_pct(m['precision'])} / {_pct(m['recall'])} / {_pct(m['f1'])}" if m else "-")
        rows.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows]) + "\n"


def summary_rows(evals: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pooled metrics per tag over 1-concept and >=3-concept splits (slot-weighted)."""
    out: dict[str, dict[str, float]] = {}
    for tag, ev in evals.items():
        for group, keys in (("k1", ["k1"]), ("k3plus", ["k3", "k4", "k5"])):
            ms = [ev[k] for k in keys if k in ev]
            if not ms:
                continue
            hits = sum(m["hits"] for m in ms)
            misses = sum(m["misses"] for m in ms)
            slots = sum(m["slots"] for m in ms)
            p = hits / (hits + misses) if hits + misses else 0.0
            r = hits / slots if slots else 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            out.setdefault(tag, {}).update({f"{group}_precision": p, f"{group}_recall": r, f"{group}_f1": f1})
    return out


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward/total_mean", "reward/name/recall_mean", "reward/name/precision_mean",
                        "train/kl", "response/length_mean") if any(k in m for m in metrics)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, key in zip(axes, keys):
        xs = [m["step"] for m in metrics if key in m]
        ax.plot(xs, [m[key] for m in metrics if key in m], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_eval(evals: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, metric in zip(axes, ("precision", "recall", "f1")):
        for tag, ev in evals.items():
            ks = _splits(ev)
            ax.plot([int(k[1:]) for k in ks], [ev[k][metric] for k in ks], marker="o", label=tag)
        ax.set_title(f"{metric} by number of concepts", fontsize=9)
        ax.set_xlabel("concepts in image")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: str | Path, evals: dict[str, dict[str, Any]]) -> Path:
    out = Path(out)
    metrics_path = out / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x] if metrics_path.exists() else []
    lines = ["# Run report", "", f"Output directory: `{out}`", ""]
    lines += ["## Evaluation (RePIC metric, %)", "", eval_table(evals)]
    pooled = summary_rows(evals)
    if pooled:
        lines += ["## Pooled", "", "| eval | 1-concept F1 | >=3-concept P | >=3-concept R | >=3-concept F1 |", "|---|---|---|---|---|"]
        for tag, row in pooled.items():
            lines.append(
                f"| {tag} | {_pct(row.get('k1_f1', 0))} | {_pct(row.get('k3plus_precision', 0))} | "
                f"{_pct(row.get('k3plus_recall', 0))} | {_pct(row.get('k3plus_f1', 0))} |"
            )
        lines.append("")
    if metrics:
        plot_curves(metrics, out / "curves.png")
        last = metrics[-1]
        lines += ["## Training", "", f"Steps: {last['step']}", "", "![curves](curves.png)", ""]
        lines += ["| metric | first step | last step |", "|---|---|---|"]
        for key in sorted(k for k in last if k.startswith(("reward/", "train/", "time/", "rollout/", "response/"))):
            if key in metrics[0]:
                lines.append(f"| {key} | {metrics[0][key]:.4g} | {last[key]:.4g} |")
        lines.append("")
    if evals:
        plot_eval(evals, out / "eval_curves.png")
        lines += ["![evaluation](eval_curves.png)", ""]
    (out / "evals.json").write_text(json.dumps(evals, indent=2))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
