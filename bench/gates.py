"""Gates of the in-context personalization ladder, measured on unseen concepts with
unseen names (held-out triples and evaluation names of an "open" world).

    # G1: vision features, nearest own reference among 2-5 (absent ones included)
    python bench/gates.py g1 --checkpoint checkpoints/tiny-vision
    # G2 / G3: greedy captions of an open world's evaluation splits (name P / R / F1 per
    # number of concepts, candidates = the names shown with the references) and yes/no
    # recognition accuracy on eval/yes_no.json when the world has it
    python bench/gates.py names --checkpoint checkpoints/tiny-sft --data WORLD_DIR
    # G2: binding, "Who is in the image?" on the single-concept evaluation split (2
    # references, 1 present); exact-name accuracy of the greedy answer
    python bench/gates.py g2 --checkpoint checkpoints/tiny-bind --data WORLD_DIR
    # G4's learning signal: n sampled captions per multi-concept evaluation prompt
    # (temperature 1, as RL samples them); per k the mean name recall of a sample, the
    # mean best recall among the n (what GRPO can reinforce), the spread within a group,
    # repeated reference names per caption, and the greedy caption's recall
    python bench/gates.py signal --checkpoint checkpoints/tiny-open --data WORLD_DIR

Each writes JSON under bench/results/ (`--out` to change) and prints a summary. Decoding
is greedy with transformers `generate` (one process, CPU).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import finish, markdown_table, setup_env

RESULTS = REPO / "bench" / "results"


def name_scores(captions: Sequence[str], samples: Sequence[Any]) -> dict[str, Any]:
    """Name precision / recall / F1 per number of concepts k and overall; each caption is
    searched for the names shown with its own references (per-sample names), with the
    slot rule of `repic_ray.evaluation.metric` (a wrong name turns a missed slot into a miss)."""
    from repic_ray.evaluation.metric import NameMetrics, slot_outcomes
    from repic_ray.matching import find_names

    overall, by_k = NameMetrics(), {}
    for caption, s in zip(captions, samples, strict=True):
        found = find_names(caption, s.ref_names)
        outcomes = slot_outcomes(found, s.concepts, s.ref_names, False)
        overall.add(outcomes)
        by_k.setdefault(len(s.concepts), NameMetrics()).add(outcomes)
    return {"overall": overall.as_dict(), "by_k": {k: m.as_dict() for k, m in sorted(by_k.items())}}


def binding_by_k(captions: Sequence[str], samples: Sequence[Any]) -> dict[str, Any]:
    """`repic_ray.evaluation.binding` per number of concepts k: the share of present concepts
    named with their own category (a right name on another object does not count)."""
    from repic_ray.evaluation.binding import binding_counts

    by_k: dict[int, list[tuple[str, Any]]] = {}
    for caption, s in zip(captions, samples, strict=True):
        by_k.setdefault(len(s.concepts or []), []).append((caption, s))
    return {k: binding_counts(*zip(*pairs)) for k, pairs in sorted(by_k.items())}


def first_name_choice(captions: Sequence[str], samples: Sequence[Any]) -> dict[str, float]:
    """For single-concept samples: what the first pool-style name in the caption is --
    the present concept's name ("right"), another reference's ("other_reference"), a
    string mixing the references' syllables ("mixed"), or none. Separates "binds the
    wrong reference" from "does not copy a whole name"."""
    from repic_ray.data.names import name_pieces

    counts = {"right": 0, "other_reference": 0, "mixed": 0, "none": 0}
    singles = [(c, s) for c, s in zip(captions, samples) if len(s.concepts) == 1]
    for caption, s in singles:
        names = []
        for word in re.findall(r"[A-Z][a-z]{3,4}", caption):
            try:
                name_pieces(word)
            except ValueError:
                continue
            names.append(word)
        if not names:
            counts["none"] += 1
        elif names[0] == s.concepts[0]:
            counts["right"] += 1
        elif names[0] in s.ref_names:
            counts["other_reference"] += 1
        else:
            counts["mixed"] += 1
    return {k: v / max(1, len(singles)) for k, v in counts.items()}


def yes_no_accuracy(answers: Sequence[str], samples: Sequence[Any]) -> dict[str, Any]:
    """Share of answers whose first word is the right "yes" / "no"."""
    def first_word(text: str) -> str:
        words = text.strip().lower().replace(".", " ").replace(",", " ").split()
        return words[0] if words else ""

    right = [first_word(a) == s.solution for a, s in zip(answers, samples, strict=True)]
    yes = [r for r, s in zip(right, samples) if s.solution == "yes"]
    no = [r for r, s in zip(right, samples) if s.solution == "no"]
    return {"accuracy": sum(right) / len(right), "n": len(right),
            "accuracy_yes": sum(yes) / max(1, len(yes)), "accuracy_no": sum(no) / max(1, len(no))}


def _generate(checkpoint: str, samples: Sequence[Any], max_tokens: int, batch_size: int,
              layout: str = "chat") -> list[str]:
    """Greedy answers; `layout="bare"` shows the samples as SFT's curriculum warm-up does
    (`repic_ray.prompts.bare_text`), "chat" as the real prompt."""
    from repic_ray.evaluation.generate import greedy_captions
    from repic_ray.models.loading import load_processor, resolve_checkpoint
    from repic_ray.prompts import Prompt, bare_text, build_prompt
    from repic_ray.rollout.config import RolloutConfig, SamplingConfig
    from repic_ray.rollout.hf_engine import HFRolloutEngine

    path = resolve_checkpoint(checkpoint)
    processor = load_processor(path)
    rng = random.Random(0)
    if layout == "bare":
        prompts = [Prompt([], list(s.images), bare_text(s.images, s.ref_names)) for s in samples]
    else:
        prompts = [build_prompt(s, processor, rng=rng, suffix_mode="none") for s in samples]
    engine = HFRolloutEngine(RolloutConfig(
        model=path, dtype="float32", limit_images_per_prompt=max(len(s.images) for s in samples),
        sampling=SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)))
    uids = [str(i) for i in range(len(prompts))]
    return greedy_captions(engine, prompts, uids, batch_size=batch_size, max_tokens=max_tokens)


def answer_name(answer: str) -> str | None:
    """The name an answer gives: its first word with punctuation and brackets stripped."""
    words = re.findall(r"[A-Za-z]+", answer)
    return words[0] if words else None


def binding_accuracy(answers: Sequence[str], samples: Sequence[Any]) -> dict[str, Any]:
    """Exact-name accuracy of short answers, and what the wrong ones were: another
    reference's name, another string, nothing."""
    counts = {"right": 0, "other_reference": 0, "other": 0}
    for a, s in zip(answers, samples, strict=True):
        name = answer_name(a)
        key = ("right" if name == s.concepts[0] else
               "other_reference" if name in s.ref_names else "other")
        counts[key] += 1
    n = len(samples)
    by_refs: dict[int, list[bool]] = {}
    for a, s in zip(answers, samples):
        by_refs.setdefault(len(s.ref_names), []).append(answer_name(a) == s.concepts[0])
    return {"accuracy": counts["right"] / n, "n": n,
            "share": {k: v / n for k, v in counts.items()},
            "by_num_refs": {r: sum(v) / len(v) for r, v in sorted(by_refs.items())}}


def gate_g2(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses as dc

    from repic_ray.data.formats import load_samples
    from repic_ray.data.synthetic import WHO_QUESTION

    if args.concepts > 1:
        return gate_g2_multi(args)
    data = Path(args.data)
    samples = [s for s in load_samples(data / "eval" / "concepts_1.json") if len(s.ref_names) == args.refs]
    samples = [dc.replace(s, problem=WHO_QUESTION) for s in samples[: args.max_samples]]
    if not samples:
        raise SystemExit(f"{data}/eval/concepts_1.json: no samples with {args.refs} references")
    start = time.perf_counter()
    answers = _generate(args.checkpoint, samples, args.max_tokens, args.batch_size, args.layout)
    result: dict[str, Any] = {"gate": "g2", "checkpoint": args.checkpoint, "data": str(data),
                              "question": WHO_QUESTION if args.layout == "chat" else None,
                              "layout": args.layout, **binding_accuracy(answers, samples)}
    if args.refs == 2:
        # The same prompts with the two reference images swapped (names stay in place): a
        # model that binds names to images must now answer the other name.
        swapped = [dc.replace(s, images=[s.images[1], s.images[0], s.images[2]],
                              concepts=[n for n in s.ref_names if n != s.concepts[0]])
                   for s in samples]
        swapped_answers = _generate(args.checkpoint, swapped, args.max_tokens, args.batch_size, args.layout)
        result["swapped_references"] = binding_accuracy(swapped_answers, swapped)
        result["answer_unchanged_when_swapped"] = sum(
            a == b for a, b in zip(answers, swapped_answers)) / len(answers)
    result["answers"] = [{"refs": s.ref_names, "present": s.concepts[0], "answer": a}
                         for s, a in zip(samples, answers)]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def gate_g2_multi(args: argparse.Namespace) -> dict[str, Any]:
    """Binding among several concepts: each evaluation image of `--concepts` k concepts (and
    its references, absent ones included) asked "Who is at the <position>?" about one of
    them, drawn with a fixed seed (`--described`: "Who is the <colour> <pattern> <category>
    at the <position>?"); the answer must be that concept's name."""
    import dataclasses as dc

    from repic_ray.data.formats import load_samples
    from repic_ray.data.synthetic import who_at_question

    path = Path(args.data) / "eval" / f"concepts_{args.concepts}.json"
    rng = random.Random(0)
    samples = []
    for s in load_samples(path)[: args.max_samples]:
        asked = rng.choice([o for o in s.objects if o.get("name")])
        samples.append(dc.replace(s, problem=who_at_question(asked, args.described),
                                  concepts=[asked["name"]]))
    if not samples:
        raise SystemExit(f"{path}: no samples")
    start = time.perf_counter()
    answers = _generate(args.checkpoint, samples, args.max_tokens, args.batch_size, args.layout)
    result: dict[str, Any] = {"gate": "g2", "checkpoint": args.checkpoint, "data": args.data,
                              "concepts": args.concepts, "described": args.described,
                              **binding_accuracy(answers, samples)}
    # a guess among the references shown: the mean of 1 / (distinct references)
    result["chance"] = sum(1 / len(set(s.ref_names)) for s in samples) / len(samples)
    result["answers"] = [{"refs": s.ref_names, "question": s.problem, "asked": s.concepts[0],
                          "answer": a} for s, a in zip(samples, answers)]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def gate_names(args: argparse.Namespace) -> dict[str, Any]:
    from repic_ray.data.formats import load_samples

    data = Path(args.data)
    result: dict[str, Any] = {"gate": "names", "checkpoint": args.checkpoint, "data": str(data)}
    samples = []
    for path in sorted((data / "eval").glob("concepts_*.json")):
        samples += load_samples(path)[: args.max_per_k]
    start = time.perf_counter()
    captions = _generate(args.checkpoint, samples, args.max_tokens, args.batch_size)
    result["names"] = name_scores(captions, samples)
    result["binding"] = binding_by_k(captions, samples)
    result["first_name_choice_single"] = first_name_choice(captions, samples)
    result["captions"] = [{"refs": s.ref_names, "present": s.concepts, "caption": c}
                          for s, c in zip(samples, captions)]
    yes_no_path = data / "eval" / "yes_no.json"
    if yes_no_path.exists():
        yn = load_samples(yes_no_path)[: args.max_yes_no]
        answers = _generate(args.checkpoint, yn, 8, args.batch_size)
        result["yes_no"] = yes_no_accuracy(answers, yn)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def attributes_next_to_names(caption: str, sample: Any, counts: list[int]) -> None:
    """For every sentence of `caption` naming a present concept, counts[1] += 1, and
    counts[0] += 1 when the sentence also holds that concept's colour, pattern and
    category words (the world's captions say "Bo the red striped dog ...")."""
    from repic_ray.matching import find_names

    objects = {o["name"]: o for o in sample.objects or [] if o.get("name")}
    present = [n for n in sample.concepts or [] if n in objects]
    for sentence in re.split(r"(?<=[.!?])\s+", caption):
        words = set(re.findall(r"[a-z]+", sentence.lower()))
        for name in find_names(sentence, present):
            o = objects[name]
            counts[1] += 1
            counts[0] += all(o.get(key) in words for key in ("colour", "pattern", "category"))


def gate_signal(args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    from repic_ray.data.formats import load_samples
    from repic_ray.matching import count_mentions
    from repic_ray.models.loading import load_processor, resolve_checkpoint
    from repic_ray.prompts import build_prompt
    from repic_ray.rewards.names import name_scores as caption_name_scores
    from repic_ray.rollout.config import RolloutConfig, SamplingConfig
    from repic_ray.rollout.hf_engine import HFRolloutEngine
    from repic_ray.rollout.types import RolloutRequest

    path = resolve_checkpoint(args.checkpoint)
    processor = load_processor(path)
    data = Path(args.data)
    result: dict[str, Any] = {"gate": "signal", "checkpoint": args.checkpoint, "data": str(data),
                              "n": args.n, "temperature": args.temperature, "seed": args.seed,
                              "by_k": {}}
    splits = {int(p.stem.split("_")[1]): load_samples(p)[: args.max_per_k]
              for p in sorted((data / "eval").glob("concepts_*.json"))}
    splits = {k: v for k, v in splits.items() if k >= 2}
    engine = HFRolloutEngine(RolloutConfig(
        model=path, dtype="float32",
        limit_images_per_prompt=max(len(s.images) for v in splits.values() for s in v),
        sampling=SamplingConfig(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens,
                                seed=args.seed)))
    start = time.perf_counter()
    for k, samples in splits.items():
        rng = random.Random(0)
        prompts = [build_prompt(s, processor, rng=rng, suffix_mode="none") for s in samples]
        mean_recall, best_recall, spread_recall, repeats, greedy = [], [], [], [], []
        bound = [0, 0]  # greedy mentions of a present concept: with its attributes, all
        for lo in range(0, len(samples), args.batch_size):
            batch = list(zip(samples[lo:lo + args.batch_size], prompts[lo:lo + args.batch_size]))
            for greedy_pass in (False, True):
                requests = [RolloutRequest(uid=f"{k}:{lo + i}", prompt_text=p.text,
                                           image_paths=list(p.image_paths), n=1 if greedy_pass else args.n)
                            for i, (_, p) in enumerate(batch)]
                sampling = SamplingConfig(n=1 if greedy_pass else args.n,
                                          temperature=0.0 if greedy_pass else args.temperature,
                                          max_tokens=args.max_tokens, seed=args.seed)
                for (s, _), out in zip(batch, engine.generate(requests, sampling)):
                    recalls = []
                    for c in out.completions:
                        correct, _, n = caption_name_scores(c.text, s.concepts, s.ref_names)
                        recalls.append(correct / n)
                        if not greedy_pass:
                            counts = count_mentions(c.text, list(s.ref_names))
                            repeats.append(sum(max(0, v - 1) for v in counts.values()))
                    if greedy_pass:
                        greedy.append(recalls[0])
                        attributes_next_to_names(out.completions[0].text, s, bound)
                    else:
                        mean_recall.append(statistics.fmean(recalls))
                        best_recall.append(max(recalls))
                        spread_recall.append(statistics.pstdev(recalls))
        result["by_k"][str(k)] = {
            "prompts": len(samples),
            "sampled_recall": statistics.fmean(mean_recall),
            "best_of_n_recall": statistics.fmean(best_recall),
            "within_group_std": statistics.fmean(spread_recall),
            "repeated_names_per_caption": statistics.fmean(repeats),
            "greedy_recall": statistics.fmean(greedy),
            "greedy_present_mentions": bound[1],
            "greedy_mentions_with_own_attributes": bound[0] / max(bound[1], 1),
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def gate_g1(args: argparse.Namespace) -> dict[str, Any]:
    from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint
    from repic_ray.pipeline.pretrain_vision import gate_episodes, nearest_reference_accuracy

    path = resolve_checkpoint(args.checkpoint)
    model, processor = load_policy(path), load_processor(path)
    start = time.perf_counter()
    res = nearest_reference_accuracy(model, processor, gate_episodes(args.episodes, seed=args.seed))
    return {"gate": "g1", "checkpoint": args.checkpoint, "episodes": args.episodes,
            "seed": args.seed, **res, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="gate", required=True)
    g1 = sub.add_parser("g1", help="vision features: nearest own reference (held-out triples)")
    g1.add_argument("--checkpoint", default="checkpoints/tiny-vision")
    g1.add_argument("--episodes", type=int, default=1000)
    g1.add_argument("--seed", type=int, default=1234, help="episode seed (the training log uses 1)")
    names = sub.add_parser("names", help="greedy captions and yes/no of an open world's eval splits")
    names.add_argument("--checkpoint", required=True)
    names.add_argument("--data", required=True, help="world directory (`--names open`)")
    names.add_argument("--max-per-k", type=int, default=60)
    names.add_argument("--max-yes-no", type=int, default=200)
    names.add_argument("--max-tokens", type=int, default=96)
    names.add_argument("--batch-size", type=int, default=16)
    g2 = sub.add_parser("g2", help="binding: 'Who is in the image?' with 1 present concept")
    g2.add_argument("--checkpoint", required=True)
    g2.add_argument("--data", required=True, help="world directory (`--names open`)")
    g2.add_argument("--refs", type=int, default=2, help="references per prompt (present + absent)")
    g2.add_argument("--max-samples", type=int, default=200)
    g2.add_argument("--max-tokens", type=int, default=8)
    g2.add_argument("--batch-size", type=int, default=16)
    g2.add_argument("--layout", choices=["chat", "bare"], default="chat",
                    help="the real prompt (the gate), or the bare layout of SFT's curriculum warm-up")
    g2.add_argument("--concepts", type=int, default=1,
                    help="concepts per image; above 1: 'Who is at the <position>?' about one of them")
    g2.add_argument("--described", action="store_true",
                    help="with --concepts > 1: the question also gives the object's attributes")
    sig = sub.add_parser("signal", help="G4's learning signal: sampled vs best-of-n name recall")
    sig.add_argument("--checkpoint", required=True)
    sig.add_argument("--data", required=True, help="world directory (`--names open`)")
    sig.add_argument("--max-per-k", type=int, default=40)
    sig.add_argument("--n", type=int, default=8, help="sampled captions per prompt (GRPO's group)")
    sig.add_argument("--temperature", type=float, default=1.0)
    sig.add_argument("--seed", type=int, default=0)
    sig.add_argument("--max-tokens", type=int, default=96)
    sig.add_argument("--batch-size", type=int, default=8)
    for sp in (g1, names, g2, sig):
        sp.add_argument("--out", help="JSON output (default bench/results/gate_<name>.json)")
        sp.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_env()
    import torch

    torch.set_num_threads(args.threads)
    result = {"g1": gate_g1, "g2": gate_g2, "names": gate_names, "signal": gate_signal}[args.gate](args)
    if args.gate == "g2":
        rows = [["G2 binding: right name", f"{result['accuracy']:.4f}", result["n"]]]
        rows += [[f"  answer is {k}", f"{v:.4f}", ""] for k, v in result["share"].items()]
        if "swapped_references" in result:
            rows.append(["reference images swapped: right name",
                         f"{result['swapped_references']['accuracy']:.4f}", result["n"]])
            rows.append(["reference images swapped: answer unchanged",
                         f"{result['answer_unchanged_when_swapped']:.4f}", result["n"]])
        if "chance" in result:
            rows[0][0] = f"binding among {args.concepts} concepts: right name"
            rows.append(["  a guess among the references", f"{result['chance']:.4f}", ""])
    elif args.gate == "signal":
        rows = [[k, m["prompts"], m["sampled_recall"], m["best_of_n_recall"], m["within_group_std"],
                 m["repeated_names_per_caption"], m["greedy_recall"], m["greedy_mentions_with_own_attributes"]]
                for k, m in result["by_k"].items()]
        out = args.out or str(RESULTS / "gate_signal.json")
        finish(result, markdown_table(["k", "prompts", "sampled recall", f"best of {args.n}",
                                       "std in group", "repeated names", "greedy recall",
                                       "greedy: name with its attributes"], rows), out)
        return 0
    elif args.gate == "g1":
        rows = [["G1 nearest reference", f"{result['accuracy']:.4f}", result["queries"]]]
        rows += [[f"  with {n} references", f"{a:.4f}", ""] for n, a in result["by_num_refs"].items()]
    else:
        rows = [[f"name F1, {k} concept(s)", f"{m['f1']:.4f}", m["records"]]
                for k, m in result["names"]["by_k"].items()]
        rows += [[f"name precision, {k} concept(s)", f"{m['precision']:.4f}", m["records"]]
                 for k, m in result["names"]["by_k"].items()]
        rows += [[f"single concept: first name is {k}", f"{v:.4f}", ""]
                 for k, v in result["first_name_choice_single"].items()]
        if "yes_no" in result:
            rows.append(["yes/no accuracy", f"{result['yes_no']['accuracy']:.4f}", result["yes_no"]["n"]])
    out = args.out or str(RESULTS / f"gate_{args.gate}.json")
    finish(result, markdown_table(["gate", "value", "n"], rows), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
