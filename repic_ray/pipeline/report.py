"""The run report: names and caption quality before/after RL, samples, training curves.

Writes `{out}/report.md` (precision / recall / F1 per concept count; names and caption
quality side by side, pooled; quality per split with a flag on every split whose quality
fell; sample captions of the same images before and after), `{out}/evals.json` (every
evaluation as measured), `{out}/curves.png` (reward, KL, response length and repetition
per step) and `{out}/eval_curves.png` (precision / recall / F1 per evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repic_ray.evaluation.quality import quality_drops

QUALITY_COLUMNS = (
    ("cider_d", "CIDEr-D", "{:.2f}"), ("bleu4", "BLEU-4", "pct"), ("meteor", "METEOR", "pct"),
    ("rouge_l", "ROUGE-L", "pct"), ("rep4", "rep-4gram", "{:.3f}"), ("distinct2", "distinct-2", "{:.3f}"),
    ("mean_words", "words", "{:.1f}"), ("at_cap", "at cap", "pct"),
)
SAMPLE_KS = (1, 3, 5)
"""Concept counts of the splits whose first images are shown as sample captions."""


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


def _fmt(value: float | None, how: str) -> str:
    if value is None:
        return "-"
    return _pct(value) if how == "pct" else how.format(value)


def names_quality_table(evals: dict[str, dict[str, Any]]) -> str:
    """One row per evaluation: pooled names (>=3-concept P / R / F1, 1-concept F1) beside
    pooled caption quality (CIDEr-D also on the 1-concept split); where the evaluation
    measured binding, the share of present concepts named with their own category
    (>=3 concepts and 1 concept) and of attribute phrases true to the image (all splits)."""
    pooled = summary_rows(evals)
    with_binding = any("binding" in ev for ev in evals.values())
    head = ["eval", ">=3 P", ">=3 R", ">=3 F1", "1 F1"]
    head += [">=3 bound", "1 bound", "true desc"] if with_binding else []
    head += ["CIDEr-D", "CIDEr-D k1", "rep-4gram", "words", "at cap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag, ev in evals.items():
        row, q = pooled.get(tag, {}), ev.get("quality", {})
        qp, q1 = q.get("pooled", {}), q.get("k1", {})
        cells = [tag, *(_fmt(row.get(k), "pct") for k in ("k3plus_precision", "k3plus_recall", "k3plus_f1", "k1_f1"))]
        if with_binding:
            b = ev.get("binding", {})
            cells += [_fmt(b.get(w, {}).get("bound_rate"), "pct") for w in ("k3plus", "k1")]
            cells.append(_fmt(b.get("pooled", {}).get("true_descriptions"), "pct"))
        cells += [_fmt(qp.get("cider_d"), "{:.2f}"), _fmt(q1.get("cider_d"), "{:.2f}"),
                  _fmt(qp.get("rep4"), "{:.3f}"), _fmt(qp.get("mean_words"), "{:.1f}"), _fmt(qp.get("at_cap"), "pct")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_table(evals: dict[str, dict[str, Any]]) -> str:
    """Rows per (split, evaluation), every quality column; percent for BLEU/METEOR/ROUGE/at cap."""
    wheres = sorted({w for ev in evals.values() for w in ev.get("quality", {})},
                    key=lambda w: (w == "pooled", int(w[1:]) if w[1:].isdigit() else 0))
    head = ["split", "eval", *(label for _, label, _ in QUALITY_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for where in wheres:
        for tag, ev in evals.items():
            q = ev.get("quality", {}).get(where)
            if q is not None:
                cells = [where, tag, *(_fmt(q.get(k), how) for k, _, how in QUALITY_COLUMNS)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_flags(evals: dict[str, dict[str, Any]], first: str = "before", last: str = "after") -> list[str]:
    """One line per split whose caption quality fell from `first` to `last`."""
    if first not in evals or last not in evals:
        return []
    qb, qa = evals[first].get("quality", {}), evals[last].get("quality", {})
    flags = []
    for where in qa:
        if where in qb:
            why = quality_drops(qb[where], qa[where])
            if why:
                flags.append(f"**Quality fell on {where}**: " + "; ".join(why))
    return flags


def sample_captions(out: Path, tags: list[str], ks=SAMPLE_KS, per_k: int = 1) -> str:
    """The first `per_k` images of each split in `ks`: concepts, then each tag's caption."""
    from repic_ray.data.formats import load_captions

    lines: list[str] = []
    for k in ks:
        records = {}
        for tag in tags:
            path = out / "eval" / tag / f"captions_k{k}.json"
            if path.exists():
                records[tag] = load_captions(path)
        if len(records) < len(tags):
            continue
        for i in range(min(per_k, *(len(r) for r in records.values()))):
            first = next(iter(records.values()))[i]
            lines.append(f"**{k} concept{'s' if k > 1 else ''}** ({', '.join(first.concepts)}), "
                         f"`{Path(first.image).name}`:\n")
            for tag, recs in records.items():
                lines.append(f"- {tag}: {recs[i].caption.strip()!r}")
            lines.append("")
    return "\n".join(lines)


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward/total_mean", "reward/name/recall_mean", "reward/name/precision_mean",
                        "train/kl", "response/length_mean", "response/repeated_4gram_mean")
            if any(k in m for m in metrics)]
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
        lines += ["## Pooled", "",
                  "| eval | 1-concept F1 | >=3-concept P | >=3-concept R | >=3-concept F1 |",
                  "|---|---|---|---|---|"]
        for tag, row in pooled.items():
            lines.append(
                f"| {tag} | {_pct(row.get('k1_f1', 0))} | {_pct(row.get('k3plus_precision', 0))} | "
                f"{_pct(row.get('k3plus_recall', 0))} | {_pct(row.get('k3plus_f1', 0))} |"
            )
        lines.append("")
    if any("quality" in ev for ev in evals.values()):
        lines += ["## Names and caption quality (pooled)", "",
                  ("Names: RePIC metric, %. Bound: % of the present concepts named with their own "
                  "category (\"Bo the red dog\", not \"Bo the blue mug\"), where the samples know it; "
                  "a name on the wrong object counts for the RePIC metric, not here. True desc: % of "
                  "the captions' colour-pattern-category phrases that match an object in the image. "
                  "Quality against the reference captions: CIDEr-D (0-10), "
                  "repeated word 4-grams per caption, mean words, % of captions at the token limit."), "",
                  names_quality_table(evals)]
        flags = quality_flags(evals)
        lines += [*flags, ""] if flags else ["No split lost caption quality from before to after.", ""]
        lines += ["## Caption quality per split", "", "BLEU-4 / METEOR / ROUGE-L / at cap in %.", "",
                  quality_table(evals)]
    tags = [t for t in ("before", "after") if t in evals]
    samples = sample_captions(out, tags) if tags else ""
    if samples:
        lines += ["## Sample captions (same images)", "", samples]
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
