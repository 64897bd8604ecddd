"""`repic sft`: supervised warm start of the policy on caption targets.

Cross-entropy on the target tokens only (prompt and images are context), with the
same DeepSpeed learner engine RL uses, in one process. Concept-name tokens can be
up-weighted (`sft.name_token_weight`): a small model otherwise learns the caption
template long before it learns which name goes with which object. The result is
a plain Hugging Face checkpoint directory (full weights, processor, tokenizer)
that RL then loads as `learner.model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from repic_ray.checkpoints import save_hf_checkpoint
from repic_ray.data.formats import TrainSample, load_samples
from repic_ray.learner.batch import SFTBatch
from repic_ray.learner.config import LearnerConfig
from repic_ray.models.loading import load_processor, resolve_checkpoint
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.pipeline.sampler import PromptSampler
from repic_ray.ports import free_port
from repic_ray.prompts import bare_text, build_prompt
from repic_ray.threads import torch_threads

log = logging.getLogger("repic.sft")


def sft_learner_config(cfg: ExperimentConfig) -> LearnerConfig:
    """The learner settings of the SFT stage: full fine-tuning (or LoRA) at `sft.lr`."""
    lora = dataclasses.replace(cfg.learner.lora, enabled=not cfg.sft.full_finetune and cfg.learner.lora.enabled)
    loss = dataclasses.replace(cfg.learner.loss, name_token_weight=cfg.sft.name_token_weight)
    return dataclasses.replace(cfg.learner, lora=lora, lr=cfg.sft.lr, loss=loss, seed=cfg.trainer.seed)


def name_token_ids(tokenizer: Any, names: list[str]) -> set[int]:
    """Token ids that spell concept names (with and without a leading space)."""
    ids: set[int] = set()
    for name in names:
        for text in (name, " " + name):
            ids.update(tokenizer.encode(text, add_special_tokens=False))
    return ids


def sft_samples(path: Path, tasks: list[str], setting: str = "sft.tasks") -> list[TrainSample]:
    """The samples of an SFT file whose `task` is one of `tasks` (ValueError if none)."""
    samples = [s for s in load_samples(path) if s.extra.get("task", "caption") in tasks]
    if not samples:
        raise ValueError(f"{path}: no SFT samples of tasks {tasks} ({setting})")
    return samples


def make_sft_batch(items: list[TrainSample], processor: Any, rng: random.Random, upweight: set[int],
                   bare: bool = False) -> SFTBatch:
    """One SFT batch; `bare` lays the samples out as `bare_text` (the curriculum's start)."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts, images, targets, weights = [], [], [], []
    for sample in items:
        if not sample.target:
            raise ValueError(f"{sample.source}[{sample.index}]: SFT sample has no 'target'")
        ids = tok.encode(sample.target, add_special_tokens=False) + [end]
        if bare:
            prompts.append(bare_text(sample.images, sample.ref_names))
            images.append(list(sample.images))
        else:
            prompt = build_prompt(sample, processor, rng=rng)
            prompts.append(prompt.text)
            images.append(list(prompt.image_paths))
        targets.append(ids)
        weights.append(sorted(set(ids) & upweight))
    return SFTBatch(prompts, images, targets, upweight_token_ids=weights if upweight else None)


def run_sft(cfg: ExperimentConfig, data_sft: Path | None = None) -> Path:
    """Train `sft.steps` steps; returns the written checkpoint directory. The torch thread
    count (`sft.num_threads`) is the caller's again afterwards."""
    with torch_threads(cfg.sft.num_threads):
        return _run_sft(cfg, data_sft)


def _run_sft(cfg: ExperimentConfig, data_sft: Path | None) -> Path:
    from repic_ray.learner.engine import LearnerEngine
    from repic_ray.pipeline.episodes import load_run_data

    data = load_run_data(cfg.data)
    path = data_sft or data.sft_path
    samples = sft_samples(path, cfg.sft.tasks)
    base = resolve_checkpoint(cfg.learner.model)
    out = Path(cfg.sft.output or Path(cfg.output_dir) / "sft")
    out.parent.mkdir(parents=True, exist_ok=True)
    processor = load_processor(base)
    # The database's names, and the names shown with references (per-sample names of
    # "per_episode" and "open" worlds are not in the database).
    names = sorted(set(data.categories) | {n for s in samples for n in s.ref_names or []})
    upweight = name_token_ids(processor.tokenizer, names) if cfg.sft.name_token_weight != 1 else set()
    engine = LearnerEngine(sft_learner_config(cfg), master_port=free_port())
    sampler = PromptSampler(samples, seed=cfg.trainer.seed)
    rng = random.Random(cfg.trainer.seed)
    log_path = out.parent / f"{out.name}_log.jsonl"
    start = time.perf_counter()
    with log_path.open("w") as logf:
        for step in range(1, cfg.sft.steps + 1):
            bare = step <= cfg.sft.bare_layout_steps
            batch = make_sft_batch([s for _, s in sampler.next(cfg.sft.batch_size)], processor, rng, upweight,
                                   bare=bare)
            stats = engine.sft_step(batch)
            if step % cfg.sft.log_every == 0 or step == cfg.sft.steps:
                rec = {"step": step, "loss": stats.loss, "lr": stats.lr, "layout": "bare" if bare else "chat",
                       "elapsed_s": round(time.perf_counter() - start, 1)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.info("sft %s", rec)
            if cfg.sft.save_every and step % cfg.sft.save_every == 0 and step < cfg.sft.steps:
                save_hf_checkpoint(engine.export_full(), base, out)
    return save_hf_checkpoint(engine.export_full(), base, out)
