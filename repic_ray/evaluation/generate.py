"""Caption evaluation splits with a checkpoint and score them: `repic eval --checkpoint ...`.

Two ways to choose the reference images of a prompt (RePIC's evaluation modes):

- **skip-retrieval** (`retrieval="skip"`): the split's own reference images, i.e. the
  ground-truth concepts of the query plus the absent ones the split lists, each image
  followed by "This is <name>." (`repic_ray.prompts.build_prompt`).
- **retrieval** (`retrieval="topk"`): the user's whole concept database is searched for
  every query image with the serving retriever (Grounding DINO crops + CLIP embeddings,
  `repic_ray.serving.retriever.ConceptRetriever`); the reference images of the top-K
  concepts go into the prompt, best first (`repic_ray.prompts.caption_prompt`). A concept
  that is not retrieved cannot be named, so recall here includes retrieval misses.

Decoding is greedy (temperature 0), one caption per query. Outputs under
`EvalConfig.out_dir()`:

    captions_k{k}.json     RePIC result file per split: [image, [concepts], caption, prompt]
    captions_all.json      every split in one result file (the overall numbers)
    references.json        {image: [reference captions]} of the evaluated queries
    candidates.json        the names looked for in captions (database names, or none)
    retrieved_k{k}.json    retrieval mode: per query, the retrieved names and scores
    metrics.json           name P / R / F1 per k and overall, caption metrics, settings

Every number in metrics.json is what `repic eval --captions FILE --candidates
candidates.json --references references.json --json` prints for the corresponding
result file: both go through `repic_ray.evaluation.scoring.score_file`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repic_ray.data.formats import (
    CaptionRecord,
    ConceptDatabase,
    DataError,
    TrainSample,
    check_images,
    load_database,
    load_samples,
    save_captions,
)
from repic_ray.evaluation.scoring import score_file
from repic_ray.prompts import Prompt, build_prompt, caption_prompt, task_suffix
from repic_ray.serving.retriever import RetrieverConfig

RETRIEVAL_MODES = ("skip", "topk")
ENGINES = ("hf", "vllm")
CANDIDATE_SOURCES = ("database", "ground_truth")
MODE_DIRS = {"skip": "skip-retrieval", "topk": "retrieval"}
"""Sub-folder of a method's results per retrieval mode."""
_METHOD_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


@dataclass
class EvalConfig:
    """One evaluation run: a policy, the evaluation splits, how references are chosen."""

    checkpoint: str = "tiny:qwen2.5-vl"
    """Policy: a Hugging Face model directory, a hub id or `tiny:qwen2.5-vl`."""
    adapter: str | None = None
    """A peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    applied on `checkpoint`; None evaluates the checkpoint alone."""
    data: str = ""
    """A synthetic world directory (eval/concepts_{k}.json, concepts/database.json) or a
    directory holding concepts_{k}.json files directly."""
    database: str | None = None
    """Concept database JSON; None looks for concepts/database.json of the world (next to
    or above the eval folder). Required by retrieval mode and by database candidates."""
    retrieval: str = "skip"
    """"skip": the split's own reference images; "topk": the top-K retrieved concepts."""
    top_k: int = 5
    """Concepts retrieved per query in retrieval mode (capped by the database size)."""
    ks: list[int] | None = None
    """Numbers of concepts per query to evaluate (files concepts_{k}.json); each must exist.
    None: every split found (RePIC's 1 to 5 concepts)."""
    max_per_k: int | None = None
    """Evaluate only the first N queries of each split; None: all of them."""
    engine: str = "vllm"
    """Generation engine: "vllm" (`VLLMRolloutEngine`) or "hf" (transformers `generate`)."""
    dtype: str = "auto"
    """Model dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16"."""
    max_tokens: int = 256
    """Most caption tokens (RePIC: 256)."""
    batch_size: int = 16
    """Prompts per `generate` call."""
    suffix: str = "none"
    """Answer-format suffix of the question (`repic_ray.prompts.SUFFIX_MODES`): "none" as
    RePIC evaluates its own model, "name" as RePIC evaluates zero-shot baselines."""
    seed: int = 0
    """Seeds the "random" suffix draw (greedy decoding itself is deterministic)."""
    candidates: str = "database"
    """Names looked for in captions: "database" (every concept of the user's database, so
    naming an absent concept costs precision) or "ground_truth" (every concept occurring in
    the result file's ground truth, as RePIC's scripts do)."""
    name_mode: str = "default"
    """Name matching of the metric: "default" or "compat" (`repic_ray.evaluation.metric`)."""
    caption_metrics: bool = True
    """Score BLEU-4 / METEOR / ROUGE-L / CIDEr against the splits' reference captions."""
    method: str = ""
    """Row label in reports and the results folder name; "" uses the checkpoint's name."""
    out: str = "eval_results"
    """Root folder; results go to `{out}/{method}/{skip-retrieval|retrieval}/` and the
    comparison report of every method found under `out` to `{out}/report.md`."""
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """Detector and CLIP of retrieval mode."""

    def __post_init__(self) -> None:
        if isinstance(self.retriever, dict):
            self.retriever = RetrieverConfig(**self.retriever)
        if not self.checkpoint:
            raise ValueError("checkpoint: must name a checkpoint")
        if not self.data:
            raise ValueError("data: must name a world or evaluation directory")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(
                f"retrieval: must be one of {list(RETRIEVAL_MODES)}, got {self.retrieval!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.candidates not in CANDIDATE_SOURCES:
            raise ValueError(
                f"candidates: must be one of {list(CANDIDATE_SOURCES)}, got {self.candidates!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.ks is not None and (
            not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks)
        ):
            raise ValueError(f"ks: must be distinct numbers >= 1, got {self.ks}")
        if self.max_per_k is not None and self.max_per_k < 1:
            raise ValueError(f"max_per_k: must be >= 1, got {self.max_per_k}")
        for name in ("max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.suffix not in ("none", "name", "random", "bare"):
            raise ValueError(f"suffix: must be none/name/random/bare, got {self.suffix!r}")
        if self.name_mode not in ("default", "compat"):
            raise ValueError(f"name_mode: must be default or compat, got {self.name_mode!r}")
        if self.method and not _METHOD_NAME.fullmatch(self.method):
            raise ValueError(
                f"method: {self.method!r} must be letters, digits, '_', '.', '+' or '-' "
                "(it names a folder)"
            )

    @property
    def method_name(self) -> str:
        if self.method:
            return self.method
        if self.checkpoint.startswith("tiny:"):
            name = self.checkpoint.replace(":", "-").replace("@", "-").replace("=", "")
        else:
            name = Path(self.checkpoint.rstrip("/")).name
        if self.adapter:
            name += "+" + Path(self.adapter.rstrip("/")).name
        return re.sub(r"[^\w.+-]", "_", name)

    def out_dir(self) -> Path:
        return Path(self.out) / self.method_name / MODE_DIRS[self.retrieval]


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class EvalData:
    """The splits to caption and the user's database."""

    splits: dict[int, list[TrainSample]]
    """k -> queries with exactly k concepts (file order, cut to `max_per_k`)."""
    split_files: dict[int, Path]
    database: ConceptDatabase | None


def split_files(data: str | Path, ks: Sequence[int] | None = None) -> dict[int, Path]:
    """k -> concepts_{k}.json under a world (`data/eval/`) or an eval directory (`data/`);
    `ks=None`: every split there.

    Raises `FileNotFoundError` naming the directory and the splits it has when a requested
    k has no file (or, for `ks=None`, when there is none)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {root} is not a directory")
    eval_dir = root / "eval" if (root / "eval").is_dir() else root
    have = sorted(
        int(m[1])
        for p in eval_dir.glob("concepts_*.json")
        if (m := re.fullmatch(r"concepts_(\d+)\.json", p.name))
    )
    if ks is None:
        if not have:
            raise FileNotFoundError(f"data: {eval_dir} has no concepts_{{k}}.json split")
        ks = have
    missing = [k for k in ks if k not in have]
    if missing:
        raise FileNotFoundError(
            f"data: {eval_dir} has no split for k={missing} (no concepts_{{k}}.json); "
            f"available: k={have}"
        )
    return {k: eval_dir / f"concepts_{k}.json" for k in ks}


def find_database(data: str | Path, database: str | None) -> Path | None:
    """The database file: `database` if given (it must exist), else concepts/database.json
    in the world folder or the folder above an eval folder, else None."""
    if database:
        path = Path(database)
        if not path.is_file():
            raise FileNotFoundError(f"database: {path} does not exist")
        return path
    root = Path(data)
    for cand in (root / "concepts" / "database.json", root.parent / "concepts" / "database.json"):
        if cand.is_file():
            return cand
    return None


def load_eval_data(cfg: EvalConfig) -> EvalData:
    """Load the requested splits and the database; every image is decoded once up front, so
    a missing or corrupt file fails here naming the file, record and image."""
    files = split_files(cfg.data, cfg.ks)
    splits = {}
    for k, path in files.items():
        samples = load_samples(path)
        if cfg.max_per_k is not None:
            samples = samples[: cfg.max_per_k]
        for s in samples:
            if not s.concepts:
                raise DataError(
                    s.source,
                    s.index,
                    "evaluation samples need the present concept names",
                    "concepts",
                )
            if len(s.concepts) != k:
                raise DataError(
                    s.source,
                    s.index,
                    f"has {len(s.concepts)} concepts in a k={k} split",
                    "concepts",
                )
        splits[k] = samples
    db_path = find_database(cfg.data, cfg.database)
    if db_path is None and (cfg.retrieval == "topk" or cfg.candidates == "database"):
        why = "retrieval mode" if cfg.retrieval == "topk" else "candidates='database'"
        raise FileNotFoundError(
            f"database: {why} needs the concept database; none found at "
            f"{cfg.data}/concepts/database.json — pass --database FILE"
        )
    database = load_database(db_path) if db_path is not None else None
    samples = [s for split in splits.values() for s in split]
    check_images(
        database=database if cfg.retrieval == "topk" else None, samples=samples, decode=True
    )
    if database is not None and cfg.candidates == "database":
        names = set(database.names())
        for s in samples:
            unknown = [c for c in s.concepts or [] if c not in names]
            if unknown:
                raise DataError(
                    s.source,
                    s.index,
                    f"concepts {unknown} are not in the database {database.path}",
                    "concepts",
                )
    return EvalData(splits, files, database)


# ---------------------------------------------------------------------------------------
# Prompts


@dataclass
class Retrieved:
    """What retrieval put into one query's prompt."""

    names: list[str]
    scores: list[float]


def question_of(sample: TrainSample, suffix: str, seed: int, uid: str) -> str:
    return sample.problem + task_suffix(
        sample.accu_reward_method, random.Random(f"{seed}:{uid}"), suffix
    )


def skip_retrieval_prompts(
    samples: Sequence[TrainSample], processor: Any, *, suffix: str, seed: int, uids: Sequence[str]
) -> list[Prompt]:
    """The split's own prompts: its reference images (named), then the query."""
    return [
        build_prompt(s, processor, rng=random.Random(f"{seed}:{uid}"), suffix_mode=suffix)
        for s, uid in zip(samples, uids)
    ]


def reference_concepts(database: ConceptDatabase) -> list[Any]:
    """The database as the retriever sees it (image bytes and their sha256)."""
    from repic_ray.serving.types import ReferenceConcept

    out = []
    for c in database:
        images = [Path(p).read_bytes() for p in c.images]
        out.append(
            ReferenceConcept(
                name=c.name,
                category=c.category,
                info=c.info,
                images=images,
                image_sha256=[hashlib.sha256(b).hexdigest() for b in images],
            )
        )
    return out


def retrieval_prompts(
    samples: Sequence[TrainSample],
    processor: Any,
    database: ConceptDatabase,
    retriever: Any,
    *,
    top_k: int,
    suffix: str,
    seed: int,
    uids: Sequence[str],
) -> tuple[list[Prompt], list[Retrieved]]:
    """Per query: the top-K database concepts by `retriever.match`, their reference images
    (each followed by its name, best concept first), then the query."""
    concepts = reference_concepts(database)
    prompts, found = [], []
    for s, uid in zip(samples, uids):
        matches = retriever.match(
            Path(s.query_image).read_bytes(), concepts, min(top_k, len(concepts))
        )
        refs = [(p, m.name) for m in matches for p in database.by_name(m.name).images]
        prompts.append(
            caption_prompt(
                s.query_image, refs, processor, question=question_of(s, suffix, seed, uid)
            )
        )
        found.append(Retrieved([m.name for m in matches], [m.score for m in matches]))
    return prompts, found


# ---------------------------------------------------------------------------------------
# Generation


def build_engine(cfg: EvalConfig, max_images: int):
    """The rollout engine for greedy captions, with `cfg.adapter` applied if given."""
    from repic_ray.models.loading import resolve_checkpoint
    from repic_ray.rollout.config import RolloutConfig, SamplingConfig

    model = resolve_checkpoint(cfg.checkpoint)
    rollout = RolloutConfig(
        model=model,
        dtype=cfg.dtype,
        enable_lora=cfg.adapter is not None,
        limit_images_per_prompt=max(1, max_images),
        sampling=SamplingConfig(n=1, temperature=0.0, max_tokens=cfg.max_tokens),
    )
    if cfg.engine == "hf":
        from repic_ray.rollout.hf_engine import HFRolloutEngine

        engine = HFRolloutEngine(rollout)
    else:
        from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

        engine = VLLMRolloutEngine(rollout)
    if cfg.adapter is not None:
        tensors, peft_config = load_adapter(cfg.adapter)
        engine.update_lora(tensors, peft_config, version=1)
    return engine


def release_engine(engine: Any) -> None:
    """Stop a vLLM engine's processes (and delete its update files); HF engines just go."""
    llm = getattr(engine, "llm", None)
    if llm is not None:
        engine.close()
        llm.llm_engine.engine_core.shutdown()


def load_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, adapter_config) of a peft adapter directory, with a clear error if incomplete."""
    from safetensors.torch import load_file

    path = Path(path)
    config, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise FileNotFoundError(
                f"adapter: {path} has no {f.name} (expected a peft adapter "
                "directory written by save_pretrained)"
            )
    try:
        peft_config = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter: {config}: invalid JSON: {exc.msg}") from exc
    return load_file(str(weights)), peft_config


def greedy_captions(
    engine: Any,
    prompts: Sequence[Prompt],
    uids: Sequence[str],
    *,
    batch_size: int,
    max_tokens: int,
) -> list[str]:
    """One greedy caption per prompt, in order (vision special tokens blocked)."""
    from repic_ray.rollout.config import SamplingConfig
    from repic_ray.rollout.types import RolloutRequest

    sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [
            RolloutRequest(uid=uid, prompt_text=p.text, image_paths=list(p.image_paths), n=1)
            for p, uid in zip(prompts[start : start + batch_size], uids[start : start + batch_size])
        ]
        texts += [r.completions[0].text.strip() for r in engine.generate(batch, sampling)]
    return texts


# ---------------------------------------------------------------------------------------
# Outputs


def write_results(
    out_dir: str | Path,
    splits: dict[int, list[TrainSample]],
    captions: dict[int, list[str]],
    prompts: dict[int, list[str]],
    *,
    candidates: list[str] | None,
    name_mode: str = "default",
    caption_metrics: bool = True,
    settings: dict[str, Any] | None = None,
    retrieved: dict[int, list[Retrieved]] | None = None,
) -> dict[str, Any]:
    """Write the result files of one evaluation and score them; returns metrics.json's content.

    Args:
        splits: k -> the evaluated samples (ground truth: `concepts`, `reference_captions`).
        captions / prompts: k -> the caption and prompt text of each sample.
        candidates: names to look for (None: the ground-truth names of each result file).
        retrieved: retrieval mode's per-query concepts, also scored as retrieval recall.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A previous run of this method and mode may have had other splits: drop its files.
    for stale in [*out.glob("captions_k*.json"), *out.glob("retrieved_k*.json")]:
        stale.unlink()
    references: dict[str, list[str]] = {}
    for k, samples in splits.items():
        for s in samples:
            if caption_metrics and not s.reference_captions:
                raise DataError(
                    s.source,
                    s.index,
                    "caption metrics need reference captions (or turn caption metrics off)",
                    "reference_captions",
                )
            refs = list(s.reference_captions or [])
            if references.setdefault(s.query_image, refs) != refs:
                raise DataError(
                    s.source,
                    s.index,
                    f"query image {s.query_image} appears again with other reference captions",
                    "reference_captions",
                )
    refs_path = out / "references.json"
    refs_path.write_text(json.dumps(references, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    cands_path = out / "candidates.json"
    cands_path.write_text(json.dumps(candidates) + "\n", encoding="utf-8")

    files: dict[str, Path] = {}
    every: list[CaptionRecord] = []
    for k in sorted(splits):
        records = [
            CaptionRecord(s.query_image, list(s.concepts or []), c, p)
            for s, c, p in zip(splits[k], captions[k], prompts[k], strict=True)
        ]
        files[str(k)] = out / f"captions_k{k}.json"
        save_captions(records, files[str(k)])
        every += records
    files["all"] = out / "captions_all.json"
    save_captions(every, files["all"])

    def score(path: Path) -> dict[str, Any]:
        return score_file(
            path,
            mode=name_mode,
            candidates=candidates,
            references=references if caption_metrics else None,
        )

    overall = score(files["all"])
    by_k = {}
    for k in sorted(splits):
        ev = score(files[str(k)])
        by_k[str(k)] = {**ev["overall"], "caption_metrics": ev.get("caption_metrics")}
    metrics: dict[str, Any] = {
        "settings": dict(settings or {}),
        "name_metric": {
            "mode": overall["mode"],
            "case_sensitive": overall["case_sensitive"],
            "num_candidates": overall["num_candidates"],
        },
        "overall": {**overall["overall"], "caption_metrics": overall.get("caption_metrics")},
        "by_k": by_k,
        "files": {key: path.name for key, path in files.items()}
        | {"references": refs_path.name, "candidates": cands_path.name},
    }
    if retrieved is not None:
        metrics["retrieval"] = _write_retrieved(out, splits, retrieved)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _write_retrieved(
    out: Path, splits: dict[int, list[TrainSample]], retrieved: dict[int, list[Retrieved]]
) -> dict[str, Any]:
    """retrieved_k{k}.json and the retrieval recall (ground-truth concepts retrieved / slots)."""
    summary: dict[str, Any] = {"by_k": {}}
    total_hit = total = 0
    for k in sorted(splits):
        rows = []
        hit = slots = 0
        for s, r in zip(splits[k], retrieved[k], strict=True):
            gt = list(s.concepts or [])
            hit += sum(g in r.names for g in gt)
            slots += len(gt)
            rows.append(
                {"image": s.query_image, "concepts": gt, "retrieved": r.names, "scores": r.scores}
            )
        (out / f"retrieved_k{k}.json").write_text(
            json.dumps(rows, indent=2) + "\n", encoding="utf-8"
        )
        summary["by_k"][str(k)] = {"recall": hit / slots if slots else 0.0, "slots": slots}
        total_hit, total = total_hit + hit, total + slots
    summary["recall"] = total_hit / total if total else 0.0
    return summary


# ---------------------------------------------------------------------------------------
# The whole run


def run_eval(cfg: EvalConfig, *, engine: Any = None, retriever: Any = None) -> dict[str, Any]:
    """Caption every requested split with `cfg.checkpoint` and write the results
    (module docstring); returns metrics.json's content.

    `engine` / `retriever`: already built ones to reuse (e.g. one engine for several
    evaluations); None builds them from `cfg`.
    """
    from repic_ray.models.loading import load_processor

    if cfg.adapter is not None:
        load_adapter(cfg.adapter)  # fail on a bad adapter before any model loads
    processor = load_processor(cfg.checkpoint)
    data = load_eval_data(cfg)

    # Prompts: the split's references, or the retrieved concepts' references.
    uids = {k: [f"k{k}:{i}" for i in range(len(split))] for k, split in data.splits.items()}
    prompts: dict[int, list[Prompt]] = {}
    retrieved: dict[int, list[Retrieved]] | None = None
    if cfg.retrieval == "skip":
        for k, split in data.splits.items():
            prompts[k] = skip_retrieval_prompts(
                split, processor, suffix=cfg.suffix, seed=cfg.seed, uids=uids[k]
            )
    else:
        if retriever is None:
            from repic_ray.serving.retriever import ConceptRetriever

            retriever = ConceptRetriever(cfg.retriever)
        retrieved = {}
        for k, split in data.splits.items():
            prompts[k], retrieved[k] = retrieval_prompts(
                split,
                processor,
                data.database,
                retriever,
                top_k=cfg.top_k,
                suffix=cfg.suffix,
                seed=cfg.seed,
                uids=uids[k],
            )

    # Greedy captions (an engine built here is released afterwards).
    own_engine = engine is None
    if own_engine:
        max_images = max(len(p.image_paths) for ps in prompts.values() for p in ps)
        engine = build_engine(cfg, max_images)
    try:
        captions = {
            k: greedy_captions(
                engine, prompts[k], uids[k], batch_size=cfg.batch_size, max_tokens=cfg.max_tokens
            )
            for k in sorted(prompts)
        }
    finally:
        if own_engine:
            release_engine(engine)

    # Result files and metrics.
    candidates = (
        sorted(data.database.names())
        if cfg.candidates == "database" and data.database is not None
        else None
    )
    settings = {k: v for k, v in asdict(cfg).items() if k != "retriever"}
    settings.update(
        method=cfg.method_name,
        mode=MODE_DIRS[cfg.retrieval],
        split_files={str(k): str(p) for k, p in data.split_files.items()},
        database=data.database.path if data.database is not None else None,
    )
    if cfg.retrieval == "topk":
        settings["retriever"] = asdict(cfg.retriever)
    return write_results(
        cfg.out_dir(),
        data.splits,
        captions,
        {k: [p.text for p in ps] for k, ps in prompts.items()},
        candidates=candidates,
        name_mode=cfg.name_mode,
        caption_metrics=cfg.caption_metrics,
        settings=settings,
        retrieved=retrieved,
    )
