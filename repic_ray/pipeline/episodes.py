"""Episodes: the data side of a training step, without Ray.

`RunData` holds what the driver samples from (training samples, evaluation splits,
the concept database, the processor that renders prompts). `make_request` turns a
sample into a rollout request; `reward_inputs` turns its completions into reward
inputs; `caption_records` writes evaluation outputs in RePIC's result format.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repic_ray.data.formats import (
    CaptionRecord,
    ConceptDatabase,
    TrainSample,
    check_images,
    load_database,
    load_samples,
)
from repic_ray.matching import lookup_name
from repic_ray.pipeline.config import DataConfig
from repic_ray.prompts import build_prompt
from repic_ray.rewards.base import RewardInput
from repic_ray.rollout.types import Completion, RolloutRequest


@dataclass
class RunData:
    """Everything a run draws prompts from."""

    train: list[TrainSample]
    eval_splits: dict[int, list[TrainSample]]
    database: ConceptDatabase | None
    world_dir: Path | None = None
    sft_path: Path | None = None
    categories: dict[str, str] = field(default_factory=dict)
    """Concept name -> category word (detector prompts)."""

    @property
    def candidates(self) -> list[str] | None:
        """Every concept name of the database (None without one)."""
        return sorted(self.categories) or None


def world_dir_for(cfg: DataConfig) -> Path:
    """The generated world for these settings, under `$REPIC_CACHE/worlds/` (created once)."""
    import dataclasses
    import hashlib

    from repic_ray.data.synthetic import WorldConfig, generate_world

    wc = cfg.world
    cache = Path(os.environ.get("REPIC_CACHE", Path.home() / ".cache" / "repic"))
    # -refs: training samples carry reference captions; -cats: and their references' categories
    key = (f"s{wc.seed}-c{wc.num_concepts}-{wc.names}-t{wc.num_train}-f{wc.num_sft}"
           f"-e{wc.num_eval_per_k}-sf{wc.sft_single_fraction:g}-refs-cats")
    keyed = ("seed", "num_concepts", "names", "num_train", "num_sft", "num_eval_per_k", "sft_single_fraction")
    others = {f.name: getattr(wc, f.name) for f in dataclasses.fields(WorldConfig)
              if f.name not in keyed and getattr(wc, f.name) != f.default}
    if others:  # settings beyond the original key get a digest (worlds cached before keep their key)
        key += "-" + hashlib.sha1(repr(sorted(others.items())).encode()).hexdigest()[:10]
    out = cache / "worlds" / key
    if not (out / "DONE").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        generate_world(tmp, config=wc)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_run_data(cfg: DataConfig) -> RunData:
    """Load (or generate) the data, validate it, and check every image exists up front."""
    if cfg.train_file:
        root = None
        train_path = Path(cfg.train_file)
        eval_dir = Path(cfg.eval_dir) if cfg.eval_dir else None
        db_path = Path(cfg.concept_db) if cfg.concept_db else None
        sft_path = Path(cfg.sft_file) if cfg.sft_file else None
    else:
        root = Path(cfg.world_dir) if cfg.world_dir else world_dir_for(cfg)
        train_path = root / "train" / "train.jsonl"
        eval_dir = root / "eval"
        db_path = root / "concepts" / "database.json"
        sft_path = root / "sft.jsonl"
    train = [s for s in load_samples(train_path) if s.accu_reward_method in cfg.train_tasks]
    if not train:
        raise ValueError(f"{train_path}: no samples of tasks {cfg.train_tasks}")
    splits: dict[int, list[TrainSample]] = {}
    if eval_dir is not None:
        for k in cfg.eval_ks:
            path = eval_dir / f"concepts_{k}.json"
            if path.exists():
                split = load_samples(path)
                splits[k] = split[: cfg.eval_max_per_k] if cfg.eval_max_per_k else split
    database = load_database(db_path) if db_path and db_path.exists() else None
    check_images(database=database, samples=train + [s for split in splits.values() for s in split])
    categories = {c.name: c.category for c in database} if database else {}
    return RunData(train, splits, database, root, sft_path, categories)


def make_request(uid: str, sample: TrainSample, processor: Any, seed: int, n: int | None = None):
    """(RolloutRequest, rendered prompt) of one sample; the random prompt suffix is seeded by uid."""
    prompt = build_prompt(sample, processor, rng=random.Random(f"{seed}:{uid}"))
    return RolloutRequest(uid=uid, prompt_text=prompt.text, image_paths=list(prompt.image_paths), n=n), prompt


def sample_categories(sample: TrainSample, categories: dict[str, str]) -> dict[str, str]:
    """Category word of each concept name `sample` can be captioned with (present concepts
    and references): from the database's `categories`, then the sample's own
    `ref_categories` and drawn objects (per-episode names are not in a database)."""
    present = list(sample.concepts or [])
    candidates = list(dict.fromkeys(sample.ref_names or present))
    found = {n: lookup_name(categories, n) for n in dict.fromkeys([*present, *candidates])}
    cats = {n: c for n, c in found.items() if c is not None}
    cats.update(zip(sample.ref_names or [], sample.ref_categories or []))
    cats.update({o["name"]: o["category"] for o in sample.objects or [] if o.get("name") and o.get("category")})
    return cats


def check_categories(samples: list[TrainSample], categories: dict[str, str], tasks: tuple[str, ...]) -> None:
    """Raise `ValueError` naming the first sample of `tasks` with a concept name (present or
    a reference) whose category is unknown: the detector reward needs one for every name a
    caption may write, and finding out mid-run would lose the run."""
    for s in samples:
        if s.accu_reward_method not in tasks:
            continue
        cats = sample_categories(s, categories)  # what the reward inputs carry
        names = [*(s.concepts or []), *(s.ref_names or [])]
        missing = sorted({n for n in names if lookup_name(cats, n) is None})
        if missing:
            where = f"{s.source}: record {s.index}" if s.source else "a training sample"
            raise ValueError(
                f"{where}: no category for {', '.join(map(repr, missing))}; the detector reward "
                "(reward.detector_weight > 0) prompts the detector with each named concept's "
                "category: give the concept a 'category' in the concept database, or the "
                "sample 'ref_categories' beside 'ref_names'"
            )


def reward_inputs(sample: TrainSample, completions: list[Completion], categories: dict[str, str]) -> list[RewardInput]:
    """One `RewardInput` per completion of `sample`."""
    present = list(sample.concepts or [])
    candidates = list(dict.fromkeys(sample.ref_names or present))
    cats = sample_categories(sample, categories)
    objects = [{k: o[k] for k in ("name", "colour", "pattern", "category") if o.get(k)}
               for o in sample.objects or [] if isinstance(o, dict)]
    return [
        RewardInput(
            completion=c.text,
            task=sample.accu_reward_method,
            solution=sample.solution,
            image_path=sample.query_image,
            concept_names=present,
            candidate_names=candidates,
            categories=cats,
            reference_captions=sample_references(sample),
            truncated=c.finish_reason == "length",
            objects=objects,
        )
        for c in completions
    ]


def caption_records(samples: list[TrainSample], texts: list[str], prompts: list[str]) -> list[CaptionRecord]:
    """Evaluation outputs in RePIC's result format `[image_path, [concepts], caption, prompt]`."""
    return [
        CaptionRecord(image=s.query_image, concepts=list(s.concepts or []), caption=t, prompt=p)
        for s, t, p in zip(samples, texts, prompts)
    ]


def sample_references(sample: TrainSample) -> list[str]:
    """Reference captions of a sample: its `reference_captions`, else its `target`."""
    if sample.reference_captions:
        return list(sample.reference_captions)
    return [sample.target] if sample.target else []


def write_reference_corpus(samples: list[TrainSample], path: Path) -> Path:
    """The CIDEr-D reward's corpus (one list of references per caption sample) as JSON."""
    corpus = [refs for refs in map(sample_references, samples) if refs]
    if not corpus:
        raise ValueError(
            "reward.caption_weight > 0 but no training sample has reference_captions or a target"
        )
    path.write_text(json.dumps(corpus))
    return path
