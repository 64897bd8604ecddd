"""`repic train`: GRPO / PPO post-training of a multimodal policy on a Ray cluster.

What runs, per step (`training_step`, top to bottom):
  1. sample P prompts (RePIC multi-image prompts: references, then the query);
  2. N vLLM rollout workers sample G completions each, with sampled-token log-probs
     and the policy version that produced them;
  3. M reward actors score them (RePIC's verifiable rewards, name precision/recall,
     detector-verified recognition, CIDEr-D caption quality; weights from config);
  4. advantages on the driver (GRPO by default: (r - group mean) / (group std + 1e-4));
  5. K DeepSpeed learner ranks take one PPO-clip step with the k3 KL to the reference
     (LoRA adapter disabled) inside the loss, loss averaged per sequence then over the
     batch (RePIC); old log-probs are the learner's own on the current weights (sync: taken
     from the training forward when the batch gets one update, else a separate pass) or the
     rollout's (async: one-step off-policy);
  6. the new LoRA tensors (or merged full weights) are published through the object
     store; each worker loads them on its next call (a restarted worker heals itself);
  7. metrics: every reward component, KL, clip fraction, entropy, lengths, the
     learner-vs-rollout log-prob mismatch, time per phase, tokens/s.

Departures from RePIC: rewards are composable (RePIC hard-wires its three); the
embedded default trains a tiny random-init model on a synthetic world on CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from actors.roles import LearnerGroup, create_reward_actors, create_rollout_workers
from actors.workers import WeightsRef
from recipes.sft import make_sft_batch, sft_samples
from repic_ray import checkpoints
from repic_ray.config import dump_yaml, to_dict
from repic_ray.evaluation import binding
from repic_ray.evaluation.quality import repeated_ngram_rate, split_quality
from repic_ray.models.loading import load_processor, resolve_checkpoint
from repic_ray.pipeline.config import ExperimentConfig, RoleResources
from repic_ray.pipeline.drift import DriftMonitor
from repic_ray.pipeline.episodes import (
    RunData,
    caption_records,
    check_categories,
    load_run_data,
    make_request,
    reward_inputs,
    sample_references,
    write_reference_corpus,
)
from repic_ray.pipeline.experience import compute_advantages, concat_reward_outputs, rollout_batch
from repic_ray.pipeline.metrics import MetricsWriter, evaluate_split_metrics
from repic_ray.pipeline.sampler import PromptSampler
from repic_ray.rewards.base import RewardOutput
from repic_ray.rollout.types import RolloutRequest, RolloutResult

log = logging.getLogger("repic.train")


# ----------------------------------------------------------------------------- state


@dataclass
class Handles:
    """Every actor of a run."""

    rollout: list[Any]
    rewards: list[Any]
    learners: LearnerGroup
    placement_groups: list[Any] = field(default_factory=list)


@dataclass
class PendingRollout:
    """Rollouts launched and not yet collected: the prompts drawn, their requests, the
    workers' result refs, and the policy version that generates them."""

    items: list[tuple[str, Any]]
    """(uid, sample) of each prompt."""
    requests: list[RolloutRequest]
    refs: list[Any]
    """Ray object refs of the workers' results (`collect_rollouts` waits on them)."""
    version: int
    """Policy version the rollouts are generated with."""
    scoring: Future | None = None
    """Async mode: the rollouts collected and scored by a driver thread while the learner
    trains (a `ScoredRollouts`); None: collected and scored when the step needs them."""


@dataclass
class ScoredRollouts:
    """A step's rollouts collected and scored: what the reward phase hands the experience phase."""

    completions: list
    """(request, completion) per sample, prompt by prompt."""
    index: list[int]
    """Each sample's prompt."""
    scored: RewardOutput
    seconds: float
    """How long collecting and scoring took once the rollouts were in."""


@dataclass
class Run:
    """The driver's state; `checkpoint_state` / `restore_state` make it resumable."""

    cfg: ExperimentConfig
    out: Path
    data: RunData
    processor: Any
    sampler: PromptSampler
    handles: Handles
    metrics: MetricsWriter
    step: int = 0
    version: int = 0
    weights: WeightsRef | None = None
    pending: PendingRollout | None = None
    """Async mode: the next step's rollouts, launched during this step."""
    seen_uids: set = field(default_factory=set)
    drift: DriftMonitor = field(default_factory=DriftMonitor)
    """Rollout length / repetition against the first steps (checkpointed)."""
    ptx_sampler: PromptSampler | None = None
    """SFT samples mixed into each update (`algo.ptx_coef` > 0; checkpointed)."""


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# ------------------------------------------------------------------------- rollouts


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (some may be empty when items < parts)."""
    bounds = np.linspace(0, len(items), parts + 1).astype(int)
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


def launch_rollouts(workers: list, requests: list[RolloutRequest], sampling, weights: WeightsRef | None) -> list:
    """Spread requests over the rollout workers; returns one ref per non-empty chunk."""
    chunks = split_evenly(requests, len(workers))
    return [w.generate.remote(chunk, sampling, weights) for w, chunk in zip(workers, chunks) if chunk]


def rollout_worker_metrics(workers: list) -> dict[str, float]:
    """Per-worker generation counters, aggregated with RLlib's MetricsLogger (sums over workers)."""
    root = MetricsLogger(root=True)
    root.aggregate(ray.get([w.reduce_metrics.remote() for w in workers]))
    out = {k: float(v) for k, v in root.compile().items()}
    if out.get("rollout/worker_generate_s"):
        out["rollout/worker_tokens_per_s"] = out["rollout/tokens"] / out["rollout/worker_generate_s"]
    return out


def collect_rollouts(refs: list, requests: list[RolloutRequest]) -> dict[str, RolloutResult]:
    """Results by uid; every request answered exactly once (retries may not duplicate)."""
    results: dict[str, RolloutResult] = {}
    for chunk in ray.get(refs):
        for res in chunk:
            if res.uid in results:
                raise RuntimeError(f"duplicate rollout result for {res.uid}")
            results[res.uid] = res
    missing = [r.uid for r in requests if r.uid not in results]
    if missing:
        raise RuntimeError(f"rollouts lost for {missing}")
    return results


def score_all(run: Run, inputs: list) -> RewardOutput:
    chunks = split_evenly(inputs, len(run.handles.rewards))
    outs = ray.get([a.score.remote(c) for a, c in zip(run.handles.rewards, chunks) if c])
    return concat_reward_outputs(outs)


# ------------------------------------------------------------------------- one step


def collect_and_score(run: Run, pending: PendingRollout,
                      results: dict[str, RolloutResult] | None = None) -> ScoredRollouts:
    """Wait for `pending`'s rollouts (unless their `results` are given), then score every
    completion on the reward actors."""
    if results is None:
        results = collect_rollouts(pending.refs, pending.requests)
    start = time.perf_counter()
    inputs, index, completions = [], [], []
    for p, (uid, sample) in enumerate(pending.items):
        comps = results[uid].completions
        inputs += reward_inputs(sample, comps, run.data.categories)
        completions += [(pending.requests[p], c) for c in comps]
        index += [p] * len(comps)
    scored = score_all(run, inputs)
    return ScoredRollouts(completions, index, scored, time.perf_counter() - start)


def in_background(fn, *args) -> Future:
    """`fn(*args)` on a daemon thread of the driver; its result or exception in the future."""
    future: Future = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=target, name="collect-and-score", daemon=True).start()
    return future


def drain_pending(run: Run) -> None:
    """Async mode: wait out the rollouts (and their scoring) launched for a step that will not
    run, so no worker or reward actor is still busy with them; errors there no longer matter."""
    pending, run.pending = run.pending, None
    if pending is None:
        return
    try:
        if pending.scoring is not None:
            pending.scoring.result()
        else:
            ray.get(pending.refs)
    except Exception as exc:  # noqa: BLE001 - the step they were for is not run
        log.info("rollouts of an abandoned step ended with %s", exc)


def sample_rollouts(run: Run) -> PendingRollout:
    """Draw the next P prompts and launch their rollouts (not waiting for them)."""
    cfg = run.cfg
    items = run.sampler.next(cfg.algo.prompts_per_step)
    requests = [make_request(uid, s, run.processor, cfg.trainer.seed, cfg.algo.group_size)[0] for uid, s in items]
    refs = launch_rollouts(run.handles.rollout, requests, cfg.sampling, run.weights)
    return PendingRollout(items, requests, refs, run.version)


def ptx_samples(cfg: ExperimentConfig, data: RunData) -> list:
    """The SFT samples of `algo.ptx_tasks` that the ptx term trains on."""
    if data.sft_path is None or not Path(data.sft_path).exists():
        raise ValueError(f"algo.ptx_coef > 0 needs SFT data; {data.sft_path} does not exist")
    if not Path(data.sft_path).read_text().strip():
        raise ValueError(
            f"algo.ptx_coef > 0 needs SFT data; {data.sft_path} has none (a generated world has "
            f"data.world.num_sft: {cfg.data.world.num_sft}): give the world SFT captions "
            "(data.world.num_sft) or a file (data.sft_file), or set algo.ptx_coef 0"
        )
    return sft_samples(data.sft_path, cfg.algo.ptx_tasks, "algo.ptx_tasks")


def next_ptx_batch(run: Run, update: int):
    """The SFT batch mixed into this update; its prompt suffixes are drawn from a seed of
    the step, so a resumed run draws the same batches."""
    rng = random.Random(f"ptx:{run.cfg.trainer.seed}:{run.step}:{update}")
    items = [s for _, s in run.ptx_sampler.next(run.cfg.algo.ptx_batch_size)]
    return make_sft_batch(items, run.processor, rng, set())


def needs_logprob_pass(cfg: ExperimentConfig) -> bool:
    """Whether the experience phase runs a learner log-prob pass before the update: in sync
    mode with several updates per batch (PPO epochs) or the KL folded into the reward, which
    need the old log-probs before the first update. Otherwise the learner takes them from
    its training forward (sync) or the rollout's are the old ones (async)."""
    return cfg.algo.mode == "sync" and (cfg.algo.updates_per_batch > 1 or cfg.algo.kl_in_reward)


def training_step(run: Run) -> dict[str, float]:
    """One RL step; returns its metrics."""
    cfg, timer = run.cfg, PhaseTimer()

    # 1-3. prompts -> rollouts -> rewards. Async: this step's rollouts were launched last
    # step and a driver thread collected and scored them while the learner trained; the
    # next step's are launched here and scored the same way during this step's update.
    with timer("generate"):
        pending = run.pending or sample_rollouts(run)
        items = pending.items
        done = pending.scoring.result() if pending.scoring is not None else None
        if done is None:
            results = collect_rollouts(pending.refs, pending.requests)
        if cfg.algo.mode == "async":
            run.pending = sample_rollouts(run)
            run.pending.scoring = in_background(collect_and_score, run, run.pending)
        else:
            run.pending = None
    for uid, _ in items:
        if uid in run.seen_uids:
            raise RuntimeError(f"prompt {uid} trained twice")
        run.seen_uids.add(uid)

    with timer("reward"):
        if done is None:
            done = collect_and_score(run, pending, results)
        completions, index, scored = done.completions, done.index, done.scored

    # 4. experience: old log-probs, advantages
    with timer("experience"):
        batch = rollout_batch(completions)
        mask_BT = batch.mask_BT
        mismatch = None
        if needs_logprob_pass(cfg):
            learner_lp_BT = run.handles.learners.compute_logprobs(batch)
            mismatch = float(((learner_lp_BT - batch.old_logprobs_BT).abs() * mask_BT).sum() / mask_BT.sum())
            batch.old_logprobs_BT = learner_lp_BT  # exact ratio 1 at the first update
        else:
            # sync with one update: old log-probs from the training forward (the learner
            # reports the mismatch); async: the rollout's, as one-step off-policy needs
            batch.on_policy = cfg.algo.mode == "sync"
        values_BT = run.handles.learners.compute_values(batch) if cfg.algo.estimator == "gae" else None
        kl_BT = None
        if cfg.algo.kl_in_reward:
            ref_BT = run.handles.learners.compute_ref_logprobs(batch)
            kl_BT = (batch.old_logprobs_BT - ref_BT) * mask_BT
        rewards_B = torch.as_tensor(scored.rewards_B, dtype=torch.float32)
        batch.advantages_BT, batch.returns_BT = compute_advantages(
            cfg.algo.estimator, rewards_B, torch.as_tensor(index), mask_BT,
            std_eps=cfg.algo.std_eps, gamma=cfg.algo.gamma, lam=cfg.algo.lam,
            kl_BT=kl_BT, kl_beta=cfg.algo.kl_reward_beta, values_BT=values_BT,
        )
        batch.values_BT = values_BT

    # 5. learner update(s)
    with timer("train"):
        for update in range(cfg.algo.updates_per_batch):
            ptx = next_ptx_batch(run, update) if run.ptx_sampler is not None else None
            stats = run.handles.learners.train_step(batch, ptx, cfg.algo.ptx_coef)
            if mismatch is None and update == 0:
                mismatch = stats.logprob_mismatch

    # 6. publish the new weights
    with timer("sync"):
        run.version += 1
        run.weights = run.handles.learners.export(cfg.cluster.weight_sync, run.version)

    # 7. metrics
    run.step += 1
    lengths = mask_BT.sum(1)
    tokens = int(lengths.sum())
    metrics = {
        "step": run.step,
        "reward/total_mean": float(rewards_B.mean()),
        "reward/total_std": float(rewards_B.std()) if len(rewards_B) > 1 else 0.0,
        "train/loss": stats.loss,
        "train/policy_loss": stats.policy_loss,
        "train/kl": stats.kl,
        "train/clip_frac": stats.clip_frac,
        "train/entropy": stats.entropy,
        "train/grad_norm": stats.grad_norm,
        "train/lr": stats.lr,
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/repeated_4gram_mean": float(np.mean([repeated_ngram_rate(c.text) for _, c in completions])),
        "response/at_cap_frac": float(np.mean([c.finish_reason == "length" for _, c in completions])),
        "rollout/logprob_mismatch": mismatch,
        "rollout/staleness": float(run.version - 1 - pending.version),
        # collecting and scoring once the rollouts were in (async: on the driver's thread,
        # during the previous step's update; time/reward is what this step waited for it)
        "perf/score_s": done.seconds,
        "perf/tokens_per_s": tokens / max(sum(timer.seconds.values()), 1e-9),
        **{f"time/{k}": v for k, v in timer.seconds.items()},
        **rollout_worker_metrics(run.handles.rollout),
        # The step's own counts, not the workers' counters: a worker killed after it
        # generated is restarted without the counters of its dead process.
        "rollout/samples": float(len(completions)),
        "rollout/tokens": float(tokens),
    }
    if run.ptx_sampler is not None:
        metrics["train/ptx_loss"] = stats.ptx_loss
    for name, values in scored.components.items():
        values = np.asarray(values, dtype=np.float64)
        metrics[f"reward/{name}_mean"] = float(values.mean())
        metrics[f"reward/{name}_std"] = float(values.std())
    if cfg.sampling.greedy_member:
        # The last completion of each group is the greedy one: the caption evaluation writes.
        greedy = [i for i in range(len(index)) if i + 1 == len(index) or index[i + 1] != index[i]]
        metrics["greedy/reward_mean"] = float(rewards_B[greedy].mean())
        metrics["greedy/repeated_4gram_mean"] = float(np.mean([repeated_ngram_rate(completions[i][1].text)
                                                               for i in greedy]))
        metrics["greedy/length_mean"] = float(lengths[greedy].float().mean())
    return metrics


# ------------------------------------------------------------------------ evaluation


def evaluate(run: Run, tag: str) -> dict[str, Any]:
    """Greedy captions of every held-out split: RePIC's precision / recall / F1 per split
    (`k{k}`), caption quality against the references per split and pooled (`quality`), and
    where the samples know their concepts' categories, whether each name sits on its own
    object (`binding`, per split and over k >= 3: `repic_ray.evaluation.binding`)."""
    cfg, out = run.cfg, run.out / "eval" / tag
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    quality_in: dict[str, tuple] = {}
    bound: dict[str, dict[str, float]] = {}
    for k, split in sorted(run.data.eval_splits.items()):
        pairs = [make_request(f"eval{k}:{i}", s, run.processor, cfg.trainer.seed, 1) for i, s in enumerate(split)]
        requests = [r for r, _ in pairs]
        refs = launch_rollouts(run.handles.rollout, requests, cfg.eval_sampling, run.weights)
        results = collect_rollouts(refs, requests)
        texts = [results[r.uid].completions[0].text for r in requests]
        rollout_worker_metrics(run.handles.rollout)  # reset the workers' counters: not training samples
        records = caption_records(split, texts, [p.text for _, p in pairs])
        summary[f"k{k}"] = evaluate_split_metrics(records, out / f"captions_k{k}.json", run.data.candidates)
        counts = binding.binding_counts(texts, split)
        if counts is not None:
            bound[f"k{k}"] = counts
        refs = [sample_references(s) for s in split]
        if all(refs):
            at_cap = [results[r.uid].completions[0].finish_reason == "length" for r in requests]
            quality_in[f"k{k}"] = (texts, refs, at_cap)
    if quality_in:
        summary["quality"] = split_quality(quality_in)
    if bound:
        k3plus = binding.pool([v for k, v in bound.items() if int(k[1:]) >= 3])
        summary["binding"] = {**bound, **({"k3plus": k3plus} if k3plus else {}),
                              "pooled": binding.pool(list(bound.values()))}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("evaluation %s: %s", tag, _eval_line(summary))
    return summary


def _eval_line(summary: dict[str, Any]) -> str:
    """One line per evaluation: F1 of each split (percent)."""
    parts = []
    for split, m in summary.items():
        if split in ("quality", "binding"):
            continue
        f1 = m.get("f1") if isinstance(m, dict) else None
        parts.append(f"{split} F1 {100 * f1:.1f}" if isinstance(f1, (int, float)) else split)
    return ", ".join(parts) or "no splits"


def eval_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """One evaluation as flat metrics: `eval/{split}/{p,r,f1}`, `eval/quality/{split}/{metric}`
    and `eval/binding/{split}/{bound_rate,named_bound_rate,misbound_per_caption,true_descriptions}`."""
    out: dict[str, float] = {}
    for split, m in summary.items():
        if split == "binding":
            for where, scores in m.items():
                out.update({f"eval/binding/{where}/{key}": float(scores[key])
                            for key in ("bound_rate", "named_bound_rate", "misbound_per_caption",
                                        "true_descriptions")})
        elif split == "quality":
            for where, scores in m.items():
                out.update({f"eval/quality/{where}/{key}": float(v) for key, v in scores.items()})
        else:
            out.update({f"eval/{split}/{key}": float(m[key]) for key in ("precision", "recall", "f1")})
    return out


# ----------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (sealed with a manifest), oldest first; `*.tmp` ignored."""
    return checkpoints.list_checkpoints(out / "checkpoints")


def resume_point(out: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest (an older one if the newest
    is corrupt); leftovers of an interrupted save are removed first."""
    root = out / "checkpoints"
    for stale in checkpoints.clean_stale(root):
        log.warning("removed %s, left by an interrupted checkpoint save", stale)
    return checkpoints.latest_valid(root)


def save_checkpoint(run: Run) -> Path:
    """Written under a temporary name, sealed with a manifest, then renamed into place."""
    path = checkpoints.step_dir(run.out / "checkpoints", run.step)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run.handles.learners.save(str(tmp / "learner"))
    state = {
        "step": run.step,
        "version": run.version,
        "sampler": run.sampler.state_dict(),
        "seen_uids": sorted(run.seen_uids),
        "drift": run.drift.state_dict(),
        "ptx_sampler": run.ptx_sampler.state_dict() if run.ptx_sampler is not None else None,
        "python_rng": repr(random.getstate()),
        "config": to_dict(run.cfg),
    }
    (tmp / "driver.json").write_text(json.dumps(state))
    checkpoints.commit(tmp, path)
    for old in checkpoint_dirs(run.out)[: -run.cfg.trainer.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def restore_checkpoint(run: Run, path: Path) -> None:
    """Learners and driver back to the checkpoint; the rollout weights re-published."""
    state = json.loads((path / "driver.json").read_text())
    run.handles.learners.load(str(path / "learner"))
    run.step, run.version = state["step"], state["version"]
    run.sampler.load_state_dict(state["sampler"])
    run.seen_uids = set(state["seen_uids"])
    if "drift" in state:
        run.drift.load_state_dict(state["drift"])
    if run.ptx_sampler is not None and state.get("ptx_sampler"):
        run.ptx_sampler.load_state_dict(state["ptx_sampler"])
    run.pending = None
    # Workers may serve a later version (the abandoned continuation's): publish the
    # restored version (at step 0, the base checkpoint); each worker loads it on its next call.
    kind = run.cfg.cluster.weight_sync
    run.weights = run.handles.learners.export(kind, run.version) if run.version else WeightsRef.base(kind)
    rollout_worker_metrics(run.handles.rollout)  # drop the abandoned steps' generation counters
    run.metrics.truncate(run.step)
    # Checkpoints after this step belong to the abandoned continuation (as its metrics
    # lines do): a later recovery must not jump forward into them.
    for newer in checkpoint_dirs(run.out):
        if int(newer.name.split("_")[1]) > run.step:
            shutil.rmtree(newer, ignore_errors=True)
    log.info("resumed from %s at step %d", path, run.step)


def recover_learners(run: Run) -> None:
    """A learner rank died: rebuild the group and continue from the newest checkpoint."""
    cfg = run.cfg
    run.handles.learners.shutdown()
    run.handles.learners = make_learners(cfg)
    path = resume_point(run.out)
    if path is None:
        raise RuntimeError("a learner failed before the first checkpoint; nothing to resume from")
    restore_checkpoint(run, path)


# ------------------------------------------------------------------------------ main


def init_ray(cfg: ExperimentConfig, log_file: Path | None = None) -> bool:
    """Start a private local cluster or join one. Returns True if this call started Ray.
    With `log_file` (a local cluster, not verbose), every Ray worker writes its output
    (vLLM, DeepSpeed, the actors' own logs) to that file instead of the console."""
    if ray.is_initialized():
        return False
    passed_on = ("HF_HUB_OFFLINE", "REPIC_CACHE", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE")
    env: dict[str, Any] = {"env_vars": {k: os.environ[k] for k in passed_on if k in os.environ}}
    if cfg.cluster.address == "local":
        if log_file is not None and not cfg.trainer.verbose:
            from recipes.console import worker_setup_hook

            env["worker_process_setup_hook"] = worker_setup_hook(log_file)
        need = (
            cfg.cluster.num_rollout_workers * cfg.cluster.rollout.num_cpus
            + cfg.cluster.num_reward_actors * cfg.cluster.reward.num_cpus
            + cfg.cluster.num_learners * cfg.cluster.learner.num_cpus
        )
        num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need)))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    elif "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Inside `ray job submit` / a KubeRay RayJob: the job's runtime env already applies
        # (restating it makes Ray refuse to merge the two).
        ray.init(address=cfg.cluster.address)
    else:
        ray.init(address=cfg.cluster.address, runtime_env=env)
    return True


def prepare_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Resolve the config (derived fields, cross-field rules; see `repic_ray.pipeline.resolve`)
    and point the rollout engine at the learner's checkpoint directory."""
    cfg = cfg.resolved()
    cfg.rollout.model = resolve_checkpoint(cfg.learner.model)
    return cfg


def learner_resources(cfg: ExperimentConfig) -> RoleResources:
    """The learner role's resources, with the threads `ClusterConfig.learner_threads` gives
    this run's mode."""
    return dataclasses.replace(cfg.cluster.learner, num_threads=cfg.cluster.learner_threads(cfg.algo.mode))


def make_learners(cfg: ExperimentConfig) -> LearnerGroup:
    c = cfg.cluster
    return LearnerGroup(cfg.learner, c.num_learners, learner_resources(cfg), c.placement_strategy,
                        c.master_port, c.placement_timeout_s)


def start_run(cfg: ExperimentConfig) -> Run:
    cfg = prepare_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    data = load_run_data(cfg.data)  # validates samples and checks every image before any actor starts
    if cfg.reward.detector_weight > 0:
        check_categories(data.train, data.categories, tuple(cfg.reward.caption_tasks))
    ptx = ptx_samples(cfg, data) if cfg.algo.ptx_coef > 0 else None  # before any actor starts
    if cfg.reward.caption_weight > 0 and not cfg.reward.caption.references_path:
        # CIDEr-D's document frequencies: the training captions' references
        cfg.reward.caption.references_path = str(write_reference_corpus(data.train, out / "reference_corpus.json"))
    processor = load_processor(cfg.rollout.tokenizer or cfg.rollout.model)
    workers, rollout_pg = create_rollout_workers(cfg)
    rewards, reward_pg = create_reward_actors(cfg)
    learners = make_learners(cfg)
    handles = Handles(workers, rewards, learners, [rollout_pg, reward_pg])
    run = Run(cfg, out, data, processor, PromptSampler(data.train, seed=cfg.trainer.seed), handles,
              MetricsWriter(out, tensorboard=cfg.trainer.tensorboard),
              drift=DriftMonitor(length_tolerance=cfg.trainer.drift_length_tolerance,
                                 rep4_rise=cfg.trainer.drift_rep4_rise),
              ptx_sampler=PromptSampler(ptx, seed=cfg.trainer.seed) if ptx is not None else None)
    if cfg.trainer.resume and (path := resume_point(out)) is not None:
        restore_checkpoint(run, path)
    return run


def record_step(run: Run, metrics: dict[str, Any], evals: dict[str, Any]) -> None:
    """Add a step's drift metrics (warning when the rollouts drift far from the first
    steps) and, when due, the periodic evaluation's scalars to `metrics`."""
    cfg = run.cfg
    drift_metrics, warning = run.drift.update(metrics)
    metrics.update(drift_metrics)
    if warning:
        log.warning("step %d: %s", run.step, warning)
    if cfg.trainer.eval_every and run.step % cfg.trainer.eval_every == 0 and run.step < cfg.trainer.steps:
        evals[f"step_{run.step}"] = evaluate(run, f"step_{run.step}")
        metrics.update(eval_scalars(evals[f"step_{run.step}"]))


def fit(run: Run) -> dict[str, Any]:
    """Evaluate, train `trainer.steps` steps (checkpointing, recovering learners), evaluate."""
    cfg = run.cfg
    evals: dict[str, Any] = {}
    if cfg.trainer.eval_before and run.step == 0 and run.data.eval_splits:
        evals["before"] = evaluate(run, "before")
    log.info("training steps %d..%d (metrics: %s)", run.step + 1, cfg.trainer.steps, run.out / "metrics.jsonl")
    progress = _progress(cfg, run.step)
    restarts = 0
    while run.step < cfg.trainer.steps:
        try:
            metrics = training_step(run)
            record_step(run, metrics, evals)
            run.metrics.write(metrics)  # before the checkpoint: a resume truncates to its step
            if cfg.trainer.checkpoint_every and run.step % cfg.trainer.checkpoint_every == 0:
                save_checkpoint(run)  # inside the try: a learner dying mid-save is recovered too
        except ray.exceptions.RayActorError as exc:
            if not _is_learner_failure(run, exc):
                raise
            restarts += 1
            if restarts > cfg.cluster.max_actor_restarts:
                raise RuntimeError(
                    f"learner failed {restarts} times, more than cluster.max_actor_restarts="
                    f"{cfg.cluster.max_actor_restarts}; stopping (last error: {exc})") from exc
            log.warning("learner failed (%s); recovering from the last checkpoint (restart %d of %d)",
                        exc, restarts, cfg.cluster.max_actor_restarts)
            recover_learners(run)
            continue
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}", kl=f"{metrics['train/kl']:.4f}")
    if progress is not None:
        progress.close()
    drain_pending(run)  # async: the rollouts launched for a step that will not run
    if not checkpoint_dirs(run.out) or checkpoint_dirs(run.out)[-1].name != f"step_{run.step:06d}":
        save_checkpoint(run)
    if run.data.eval_splits:
        evals["after"] = evaluate(run, "after")
    log.info("exported the policy to %s", export_policy(run))
    run.metrics.close()
    return evals


def export_policy(run: Run) -> Path:
    """The trained policy in loadable form: `final/model` (merged full weights, a plain
    HF checkpoint) and, with LoRA, `final/adapter` (peft format over the base model)."""
    from repic_ray.checkpoints import save_hf_checkpoint
    from repic_ray.rollout.common import write_peft_adapter

    final = run.out / "final"
    final.mkdir(parents=True, exist_ok=True)
    base = run.cfg.rollout.model
    if run.cfg.learner.lora.enabled:
        tensors, peft_config = ray.get(run.handles.learners.export("lora", run.version).ref)
        write_peft_adapter(final / "adapter", tensors, peft_config)
    save_hf_checkpoint(ray.get(run.handles.learners.export("full", run.version).ref), base, final / "model")
    return final


def _progress(cfg: ExperimentConfig, start: int):
    if not cfg.trainer.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.trainer.steps, initial=start, desc="train", unit="step")


def _is_learner_failure(run: Run, exc: Exception) -> bool:
    actor_id = getattr(exc, "actor_id", None)
    ids = {a._actor_id.hex() for a in run.handles.learners.actors}
    return actor_id is None or actor_id in ids


def shutdown(run: Run) -> None:
    from ray.util.placement_group import remove_placement_group

    for a in run.handles.rollout + run.handles.rewards:
        ray.kill(a)
    run.handles.learners.shutdown()
    for pg in run.handles.placement_groups:
        remove_placement_group(pg)


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run a whole experiment: start (or join) Ray, train, evaluate, write the report.
    The console shows the progress bar and `repic.*` messages; library logs go to
    `{output_dir}/log.txt` (all of them on the console too with `trainer.verbose`)."""
    from recipes.console import route_library_loggers, setup_logging

    log_file = Path(cfg.output_dir) / "log.txt"
    setup_logging(log_file, cfg.trainer.verbose)
    log.info("starting Ray and the actors (library logs: %s)", log_file)
    started = init_ray(cfg, log_file)
    route_library_loggers()  # Ray set up its loggers while starting
    try:
        run = start_run(cfg)
        try:
            evals = fit(run)
            from repic_ray.pipeline.report import write_report

            write_report(run.out, evals)
            return evals
        finally:
            shutdown(run)
    finally:
        if started:
            ray.shutdown()
