"""Reward-weight sweep of the main job: names vs caption quality after RL, per setting.

    python bench/sweep_reward.py [--settings names,cap0.1,cap0.3] [--steps 60] [--seed 0]
                                 [--config configs/tiny_fixed.yaml] [--out bench/results/sweep_reward.json]

Runs `repic train --config CONFIG` (default configs/tiny_fixed.yaml) once per weight setting (one after the
other, each in its own process, output under runs/sweep_reward/SETTING-sSEED), reads its
evals.json and records, before (the SFT checkpoint) and after RL: >=3-concept precision /
recall / F1, 1-concept F1, pooled and 1-concept CIDEr-D, pooled repeated-4-gram rate,
mean words and the share of captions at the token cap, plus the wall time. Results are
merged into `--out` by (setting, seed, steps), so settings can be run in separate calls.
A setting is a list of dotted overrides on the recipe (see SETTINGS); each names
`sampling.greedy_member`, so a setting means the same whatever the recipe's default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = "configs/tiny_fixed.yaml"
"""The recipe of rows that do not record theirs (every row before `--config` existed)."""

CAPTION_PENALTIES = [
    "--reward.caption.max_words", "80", "--reward.caption.length_penalty", "1.0",
    "--reward.caption.repetition_ngram", "4", "--reward.caption.repetition_penalty", "2.0",
]
STRONG_PENALTIES = [
    "--reward.caption.max_words", "60", "--reward.caption.length_penalty", "1.0",
    "--reward.caption.repetition_ngram", "4", "--reward.caption.repetition_penalty", "1.0",
]
SETTINGS: dict[str, list[str]] = {
    # the name reward alone (the recipe before the caption-quality reward)
    "names": ["--reward.caption_weight", "0", "--sampling.greedy_member", "false"],
    "cap0.1": ["--reward.caption_weight", "0.1", *CAPTION_PENALTIES, "--sampling.greedy_member", "false"],
    "cap0.3": ["--reward.caption_weight", "0.3", *CAPTION_PENALTIES, "--sampling.greedy_member", "false"],
    "cap1.0": ["--reward.caption_weight", "1.0", *CAPTION_PENALTIES, "--sampling.greedy_member", "false"],
    # penalties at full strength, CIDEr-D scaled down inside the caption reward: total =
    # names + cider_weight * CIDEr-D - 1.0 * repeated-4-gram share - 1.0 * (words - 60) / 60
    "cider0.1-pen": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.1", *STRONG_PENALTIES,
                     "--sampling.greedy_member", "false"],
    "cider0.05-pen": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.05", *STRONG_PENALTIES,
                     "--sampling.greedy_member", "false"],
    "cider0.03-pen": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.03", *STRONG_PENALTIES,
                     "--sampling.greedy_member", "false"],
    # the same at sampling temperature 0.6: rollouts closer to the greedy caption the
    # evaluation (and the service) writes, so the repetition penalty sees its loops
    "cider0.03-pen-t0.6": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.03",
                           *STRONG_PENALTIES, "--sampling.temperature", "0.6", "--sampling.greedy_member", "false"],
    "cider0.1-pen-t0.6": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.1",
                          *STRONG_PENALTIES, "--sampling.temperature", "0.6", "--sampling.greedy_member", "false"],
    # one greedy completion in each group of 8 (`sampling.greedy_member`): the caption the
    # evaluation writes is rewarded and penalized in training too
    "cider0.03-pen-greedy": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.03",
                             *STRONG_PENALTIES, "--sampling.greedy_member", "true"],
    "cider0.1-pen-greedy": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.1",
                            *STRONG_PENALTIES, "--sampling.greedy_member", "true"],
    "cider0.03-pen-greedy-kl0.05": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.03",
                                    *STRONG_PENALTIES, "--sampling.greedy_member", "true",
                                    "--learner.loss.kl_beta", "0.05"],
    "cider0.05-pen-greedy": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.05",
                             *STRONG_PENALTIES, "--sampling.greedy_member", "true"],
    # the default plus SFT captions mixed into every update (PPO-ptx, `algo.ptx_coef`)
    "cider0.05-pen-greedy-ptx0.1": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.05",
                                    *STRONG_PENALTIES, "--sampling.greedy_member", "true",
                                    "--algo.ptx_coef", "0.1"],
    "cider0.05-pen-greedy-ptx0.3": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.05",
                                    *STRONG_PENALTIES, "--sampling.greedy_member", "true",
                                    "--algo.ptx_coef", "0.3"],
    "cider0.05-pen-greedy-ptx0.5": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.05",
                                    *STRONG_PENALTIES, "--sampling.greedy_member", "true",
                                    "--algo.ptx_coef", "0.5"],
    # repeated word 3-grams, penalty 2 x their share
    "cider0.03-rep3-greedy": ["--reward.caption_weight", "1.0", "--reward.caption.cider_weight", "0.03",
                              "--reward.caption.max_words", "60", "--reward.caption.length_penalty", "1.0",
                              "--reward.caption.repetition_ngram", "3", "--reward.caption.repetition_penalty", "2.0",
                              "--sampling.greedy_member", "true"],
    "cap0.3-kl0.05": ["--reward.caption_weight", "0.3", *CAPTION_PENALTIES,
                      "--learner.loss.kl_beta", "0.05", "--sampling.greedy_member", "false"],
    # the main job's recipe (run with --config configs/tiny_cpu.yaml): as it is, then with
    # repeated 4-grams penalized 3x, and with a flat penalty on captions cut at the token limit
    "recipe": ["--sampling.greedy_member", "true"],
    "rep3x": ["--reward.caption.repetition_penalty", "3.0", "--sampling.greedy_member", "true"],
    "rep3x-cut1": ["--reward.caption.repetition_penalty", "3.0", "--reward.caption.truncation_penalty", "1.0",
                   "--sampling.greedy_member", "true"],
    "cut1": ["--reward.caption.truncation_penalty", "1.0", "--sampling.greedy_member", "true"],
    # prompts per step (the main job's recipe: 32 since 2026-11-29, 8 before; the rows named
    # `recipe` before that date are `pps8`)
    "pps8": ["--algo.prompts_per_step", "8", "--sampling.greedy_member", "true"],
    "pps32": ["--algo.prompts_per_step", "32", "--sampling.greedy_member", "true"],
    "pps32-rep3x-cut1": ["--algo.prompts_per_step", "32", "--reward.caption.repetition_penalty", "3.0",
                         "--reward.caption.truncation_penalty", "1.0", "--sampling.greedy_member", "true"],
    # several optimizer steps on each rollout batch (PPO epochs, clipped ratio): 8 prompts a
    # step, 4 updates each, about the learner work of 32 prompts a step with 4x the updates
    "pps8-upb4": ["--algo.prompts_per_step", "8", "--algo.updates_per_batch", "4", "--sampling.greedy_member", "true"],
    # groups of 16 samples (16 prompts a step: the same samples a step as the recipe)
    "g16": ["--algo.group_size", "16", "--algo.prompts_per_step", "16", "--sampling.greedy_member", "true"],
    # the recipe with 3x the learning rate (LoRA, 6e-3), and with hotter sampling (1.3)
    "pps32-lr3x": ["--algo.prompts_per_step", "32", "--learner.lr", "6.0e-3", "--sampling.greedy_member", "true"],
    "pps32-t1.3": ["--algo.prompts_per_step", "32", "--sampling.temperature", "1.3",
                   "--sampling.greedy_member", "true"],
    # the recipe plus the description reward (true attribute phrases, names bound to their
    # own object's attributes), at two weights, and its binding half alone
    "desc0.5": ["--reward.description_weight", "0.5", "--sampling.greedy_member", "true"],
    "desc1": ["--reward.description_weight", "1.0", "--sampling.greedy_member", "true"],
    "bound1": ["--reward.description_weight", "1.0", "--reward.description.truth_weight", "0",
               "--sampling.greedy_member", "true"],
}


def summarize(evals: dict) -> dict:
    """Names and quality of one evaluation (an entry of a run's evals.json)."""
    from repic_ray.pipeline.report import summary_rows

    names = summary_rows({"x": evals})["x"]
    q = evals.get("quality", {})
    pooled, k1 = q.get("pooled", {}), q.get("k1", {})
    return {
        "k3plus_f1": names.get("k3plus_f1"),
        "k3plus_precision": names.get("k3plus_precision"),
        "k3plus_recall": names.get("k3plus_recall"),
        "k1_f1": names.get("k1_f1"),
        "precision_by_k": {k: v["precision"] for k, v in evals.items() if k[1:].isdigit()},
        "cider_d": pooled.get("cider_d"),
        "cider_d_k1": k1.get("cider_d"),
        "rep4": pooled.get("rep4"),
        "rep4_by_k": {k: v.get("rep4") for k, v in q.items() if k != "pooled"},
        "mean_words": pooled.get("mean_words"),
        "at_cap": pooled.get("at_cap"),
        "quality": q,
        # names on their own object's category (>=3 concepts) and true attribute phrases
        # (all splits), where the evaluation knows the objects
        "k3plus_bound": evals.get("binding", {}).get("k3plus", {}).get("bound_rate"),
        "true_descriptions": evals.get("binding", {}).get("pooled", {}).get("true_descriptions"),
    }


def run_setting(name: str, seed: int, steps: int, root: Path, config: str = DEFAULT_CONFIG,
                extra: list[str] | None = None) -> dict:
    out = root / f"{name}-s{seed}"
    cmd = [
        sys.executable, "-m", "recipes.cli", "train", "--config", config,
        "--trainer.output_dir", str(out), "--trainer.steps", str(steps),
        "--trainer.seed", str(seed), "--sampling.seed", str(seed),
        "--trainer.progress_bar", "false", *SETTINGS[name], *(extra or []),
    ]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    evals = json.loads((out / "evals.json").read_text())
    return {
        "setting": name, "config": config, "overrides": SETTINGS[name] + (extra or []), "seed": seed,
        "steps": steps,
        "wall_s": round(wall, 1), "out": str(out),
        "before": summarize(evals["before"]), "after": summarize(evals["after"]),
    }


def missed_targets(row: dict) -> list[str]:
    """The main job's targets this run misses (empty: all met): >=3-concept F1 +20 points;
    precision not lower on k>=3 splits and pooled; CIDEr-D not lower pooled and on k=1;
    repeated-4-gram rate <= after SFT + 0.02 and mean words within 25 % on every split;
    <= 5 % of captions at the token cap."""
    b, a = row["before"], row["after"]
    missed = []
    if a["k3plus_f1"] < b["k3plus_f1"] + 0.20:
        missed.append("F1+20")
    low = [k for k in ("k3", "k4", "k5") if a["precision_by_k"].get(k, 1) < b["precision_by_k"].get(k, 0)]
    if a["k3plus_precision"] < b["k3plus_precision"]:
        low.append("pooled")
    if low:
        missed.append("P " + ",".join(low))
    if a["cider_d"] < b["cider_d"] or a["cider_d_k1"] < b["cider_d_k1"]:
        missed.append("CIDEr-D")
    qb, qa = b["quality"], a["quality"]
    splits = [k for k in qa if k != "pooled" and k in qb]
    if any(qa[k]["rep4"] > qb[k]["rep4"] + 0.02 for k in splits):
        missed.append("rep-4gram")
    if any(abs(qa[k]["mean_words"] - qb[k]["mean_words"]) > 0.25 * qb[k]["mean_words"] for k in splits):
        missed.append("length")
    if a["at_cap"] > 0.05:
        missed.append("at cap")
    return missed


def table(rows: list[dict]) -> str:
    """Markdown: one row per run, names and quality after SFT -> after RL."""
    head = ["setting", "seed", "steps", ">=3 F1", ">=3 P", "P k3/k4/k5", "CIDEr-D pooled", "CIDEr-D k1",
            "rep-4gram", "words", "at cap", "wall", "targets missed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def arrow(key, fmt, scale=1.0):
        b, a = rows_b[key], rows_a[key]
        return f"{fmt.format(scale * b)} → {fmt.format(scale * a)}"

    for r in rows:
        rows_b, rows_a = r["before"], r["after"]
        pk = "/".join(f"{100 * r['after']['precision_by_k'].get(k, 0):.0f}" for k in ("k3", "k4", "k5"))
        pk_b = "/".join(f"{100 * r['before']['precision_by_k'].get(k, 0):.0f}" for k in ("k3", "k4", "k5"))
        lines.append("| " + " | ".join([
            r["setting"], str(r["seed"]), str(r["steps"]), arrow("k3plus_f1", "{:.1f}", 100),
            arrow("k3plus_precision", "{:.1f}", 100), f"{pk_b} → {pk}", arrow("cider_d", "{:.2f}"),
            arrow("cider_d_k1", "{:.2f}"), arrow("rep4", "{:.3f}"), arrow("mean_words", "{:.1f}"),
            arrow("at_cap", "{:.0f}%", 100), f"{r['wall_s'] / 60:.1f} min",
            ", ".join(missed_targets(r)) or "none",
        ]) + " |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str:
    """Markdown: settings run with several seeds, each change after SFT -> after RL as the mean
    over seeds (min..max), and how many seeds meet every target."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["steps"]), []).append(r)
    head = ["setting", "steps", "seeds", ">=3 F1 change", ">=3 P change", "CIDEr-D change (pooled)",
            "CIDEr-D change (k1)", "rep-4gram change", "words change", "seeds meeting every target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def change(rs, key, scale=1.0, fmt="{:+.1f}"):
        d = [scale * (r["after"][key] - r["before"][key]) for r in rs]
        return f"{fmt.format(sum(d) / len(d))} ({fmt.format(min(d))}..{fmt.format(max(d))})"

    for (name, steps), rs in groups.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        words = [100 * (r["after"]["mean_words"] / r["before"]["mean_words"] - 1) for r in rs]
        lines.append("| " + " | ".join([
            name, str(steps), ",".join(str(r["seed"]) for r in rs), change(rs, "k3plus_f1", 100),
            change(rs, "k3plus_precision", 100), change(rs, "cider_d", fmt="{:+.2f}"),
            change(rs, "cider_d_k1", fmt="{:+.2f}"), change(rs, "rep4", fmt="{:+.3f}"),
            f"{sum(words) / len(words):+.0f} % ({min(words):+.0f}..{max(words):+.0f})",
            f"{sum(not missed_targets(r) for r in rs)} of {len(rs)}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="names,cap0.1,cap0.3", help=f"comma-separated, of {list(SETTINGS)}")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="the recipe (configs/tiny_cpu.yaml: the main job; rows record it)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="one more dotted override for every run, e.g. --set cluster.learner.num_threads 1 "
                        "(the rows measured before 2026-11-29); not part of the row's key")
    p.add_argument("--root", default="runs/sweep_reward")
    p.add_argument("--out", default="bench/results/sweep_reward.json")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = json.loads((REPO / args.out).read_text())
        print(table(rows) + "\n\nOver seeds:\n\n" + seed_table(rows))
        return 0
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        extra = [x for key, value in args.set for x in (f"--{key}", value)]
        row = run_setting(name, args.seed, args.steps, REPO / args.root, args.config, extra)
        rows = json.loads(out.read_text()) if out.exists() else []
        key = (name, args.seed, args.steps, args.config)
        rows = [r for r in rows
                if (r["setting"], r["seed"], r["steps"], r.get("config", DEFAULT_CONFIG)) != key]
        out.write_text(json.dumps([*rows, row], indent=2) + "\n")
        b, a = row["before"], row["after"]
        print(
            f"{name} seed {args.seed}: >=3 F1 {100 * b['k3plus_f1']:.1f} -> {100 * a['k3plus_f1']:.1f}, "
            f"P {100 * b['k3plus_precision']:.1f} -> {100 * a['k3plus_precision']:.1f}, "
            f"CIDEr-D {b['cider_d']:.2f} -> {a['cider_d']:.2f}, rep4 {b['rep4']:.3f} -> {a['rep4']:.3f}, "
            f"words {b['mean_words']:.1f} -> {a['mean_words']:.1f} ({row['wall_s']:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
