"""Regenerate the result tables of BENCHMARKS.md from the committed JSON under bench/results/.

Each table in BENCHMARKS.md sits between `<!-- result: NAME -->` and `<!-- /result -->`;
NAME is a result file `bench/results/NAME.json`, written by the command the section gives.
The table shows that file's numbers (with its machine, load and date), so the text cannot
drift from the measurement. A marker whose file is missing is reported, not left stale.

    python bench/report.py            # rewrite BENCHMARKS.md in place
    python bench/report.py --check    # exit 1 if BENCHMARKS.md differs from the results
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import markdown_table

MARKER = re.compile(r"(<!-- result: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /result -->)", re.DOTALL)


def _machine(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    start, end = m.get("load_avg_1_5_15_at_start"), m.get("load_avg_1_5_15_at_end")
    load = (f"load (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in start)}, at end "
            f"{'/'.join(f'{x:.1f}' for x in end)}") if start and end else "load not recorded"
    return (f"{m.get('cpu_count')} cores, gpu {m.get('gpu')}, torch {m.get('torch')}, vLLM {m.get('vllm')}, "
            f"transformers {m.get('transformers')}, {load}; command: `{r.get('command', '?')}`")


def _spread(s: dict) -> str:
    return f"{s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})"


def render_rl_step(r: dict) -> str:
    rows = [[name, _spread(r[name]["step_seconds"]), r[name]["samples_per_s_median"],
             r[name]["completion_tokens_mean"],
             ", ".join(f"{k} {v:.2f}" for k, v in r[name]["phase_seconds_per_step"].items())]
            for name in ("ours", "ours_async", "trl") if name in r]
    table = markdown_table(["system", "s/step median (min-max)", "samples/s", "tokens/sample",
                            "s/step per phase"], rows)
    for suffix, label in (("", "Ours (sync)"), ("_async", "Ours (async)")):
        if f"speedup_samples_per_s{suffix}" in r:
            table += (f"\n\n{label} / TRL, samples/s: **{r[f'speedup_samples_per_s{suffix}']:.2f}x** (median "
                      f"over rounds; rounds {', '.join(f'{x:.2f}' for x in r[f'speedup_per_round{suffix}'])}).")
    return table


def render_rollout(r: dict) -> str:
    rows = [[name, _spread(r[name]["samples_per_s"]), r[name]["tokens_per_s_median"],
             r[name]["mean_completion_tokens"]] for name in ("vllm", "hf_generate") if name in r]
    table = markdown_table(["engine", "samples/s median (min-max)", "tokens/s median", "tokens/sample"], rows)
    if "speedup_samples_per_s" in r:
        table += (f"\n\nvLLM / HF generate: **{r['speedup_samples_per_s']:.2f}x** samples/s, "
                  f"{r['speedup_tokens_per_s']:.2f}x tokens/s (median of pairs; HF with "
                  f"{r['setup'].get('hf_threads')} threads, vLLM's worker on "
                  f"{r['setup'].get('vllm_cores', 1)} core(s)).")
    return table


def render_serving(r: dict) -> str:
    rows = [[name, _spread(r[name]["throughput_rps"]), _spread(r[name]["p50_s"]), _spread(r[name]["p99_s"]),
             r[name]["completion_tokens_per_request"], r[name]["errors"]]
            for name in ("ray_serve_vllm", "fastapi_hf_batched") if name in r]
    table = markdown_table(["system", "req/s", "p50 s", "p99 s", "tokens/request", "errors"], rows)
    table += (f"\n\nServe / batched baseline: **{r['throughput_ratio_median']:.2f}x** throughput, "
              f"{r['p99_ratio_median']:.2f}x p99 (medians over rounds).")
    return table


def render_profile(r: dict) -> str:
    rows = [["pipeline step", _spread(r["pipeline_step"]["step_seconds"])]]
    rows += [[f"  its phase `{k}`", f"{v:.3g}"] for k, v in r["pipeline_step"]["phases_median"].items()]
    if "worker_generate_median" in r["pipeline_step"]:
        inside = r["pipeline_step"]["worker_generate_median"]
        rows.append(["    of `generate`: the worker's engine.generate", f"{inside:.3g}"])
    sync = r.get("setup", {}).get("weight_sync", "lora")
    labels = {"generate_via_actor": f"generate via rollout actor ({sync} sync)",
              "generate_via_actor_lora": "generate via rollout actor (lora sync)",
              "generate_direct_base": "generate in-process, base weights",
              "generate_direct_lora": "generate in-process, LoRA adapter",
              "generate_direct_merged": "generate in-process, merged weights",
              "learner_logprobs_via_group": "learner log-prob pass via group",
              "learner_train_via_group": "learner update via group",
              "learner_export": f"learner export + publish ({sync})",
              "learner_export_lora": "learner export lora",
              "worker_load_weights": f"rollout worker loads the new version ({sync})"}
    rows += [[label, _spread(r[key])] for key, label in labels.items() if key in r]
    return markdown_table(["part", "seconds median (min-max)"], rows)


def render_weight_sync(r: dict) -> str:
    rows = [[k, r[k]["payload_bytes"] / 1e6, r[k]["export_publish_seconds"], r[k]["worker_load_seconds"],
             r[k]["sync_seconds"], r[k]["step_seconds"], f"{100 * r[k]['sync_fraction_of_step']:.1f}%"]
            for k in ("lora", "full") if k in r]
    return markdown_table(["weights sent", "MB", "export + publish s", "worker load s", "sync s", "step s",
                           "sync / step"], rows)


def render_async(r: dict) -> str:
    rows = []
    for mode in ("sync", "async"):
        m = r[mode]
        ph = m["phase_seconds_per_step"]
        times = spread_of(m.get("step_seconds"))
        rows.append([mode, m["seconds"], times, m["samples_per_s"], ph.get("generate", 0.0), ph.get("train", 0.0),
                     m["staleness_mean"]])
    table = markdown_table(["mode", "wall s", "s/step median (min-max)", "samples/s", "waiting for rollouts s/step",
                            "train s/step", "staleness"], rows)
    return table + f"\n\nSync / async wall time: **{r['speedup_wall']:.2f}x**."


def render_scaling(r: dict) -> str:
    rows = [[x["workers"], x["samples_per_s"], x["tokens_per_s"], x["speedup_vs_first"], x["efficiency"],
             x["startup_seconds"]] for x in r["rows"]]
    return markdown_table(["workers", "samples/s", "tokens/s", "speed-up vs first", "efficiency", "start s"], rows)


def spread_of(values) -> str:
    if not values or not isinstance(values, list):
        return "-"
    ordered = sorted(values)
    half = len(ordered) // 2
    mid = ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2
    return f"{mid:.3g} ({ordered[0]:.3g}-{ordered[-1]:.3g})"


def render_generic(r: dict) -> str:
    rows = [[k, json.dumps(v)[:120]] for k, v in r.items() if k not in ("machine", "command", "rounds", "calls")]
    return markdown_table(["field", "value"], rows)


RENDERERS = {"rl_step": render_rl_step, "rollout": render_rollout, "serving": render_serving,
             "profile_step": render_profile, "weight_sync": render_weight_sync, "async": render_async,
             "scaling": render_scaling}


def render(name: str, results_dir: Path) -> str:
    path = results_dir / f"{name}.json"
    if not path.exists():
        return f"_No result: `bench/results/{path.name}` has not been produced by its command yet._\n"
    r = json.loads(path.read_text())
    body = RENDERERS.get(name.split(".")[0], render_generic)(r)
    return f"{body}\n\nMachine: {_machine(r)}\n"


def rewrite(text: str, results_dir: Path) -> str:
    return MARKER.sub(lambda m: m.group(1) + render(m.group("name"), results_dir) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--results", default=str(REPO / "bench" / "results"))
    p.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = p.parse_args(argv)
    path = Path(args.file)
    old = path.read_text()
    new = rewrite(old, Path(args.results))
    if args.check:
        if new != old:
            print(f"{path} is out of date with {args.results}: run python bench/report.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
