"""The Ray training pipeline on the tiny model: real Ray, vLLM, DeepSpeed and reward actors.

One run (2 rollout workers, 1 reward actor, 1 learner) is shared by the tests in this
module, in order: a step, a resumed step equal to the uninterrupted one, a killed rollout
worker, a killed reward actor, a killed learner, async mode, full-weight sync, workers
sent back to the base checkpoint. Slow: ~5-10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math

import pytest
import ray

from actors.workers import WeightsRef
from recipes import train
from repic_ray.config import load_config
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.pipeline.episodes import make_request

pytestmark = pytest.mark.slow

# Keys that must be identical between two runs of the same step (not wall-clock timings).
DETERMINISTIC = ("reward/total_mean", "reward/total_std", "train/loss", "train/kl", "train/entropy",
                 "response/length_mean", "reward/name/recall_mean", "reward/name/wrong_mean",
                 "train/ptx_loss")


def tiny_cfg(tmp_path, **over) -> ExperimentConfig:
    args = [
        "--learner.model", "tiny:qwen2.5-vl",
        "--trainer.output_dir", str(tmp_path / "run"),
        "--trainer.progress_bar", "false",
        "--trainer.tensorboard", "false",
        "--trainer.checkpoint_every", "1",
        "--trainer.keep_checkpoints", "5",
        "--algo.prompts_per_step", "2",
        "--algo.group_size", "4",
        "--sampling.max_tokens", "24",
        "--eval_sampling.max_tokens", "24",
        "--data.eval_ks", "[1, 3]",
        "--data.eval_max_per_k", "2",
        "--cluster.num_rollout_workers", "2",
        # the LoRA path (the recipe syncs merged weights; the last test switches to them)
        "--cluster.weight_sync", "lora",
        "--rollout.enable_lora", "true",
        # SFT captions mixed into each update (PPO-ptx): drawn, sharded and resumed like prompts
        "--algo.ptx_coef", "0.1",
        "--algo.ptx_batch_size", "4",
        # eager vLLM: these tests restart engines; compiling each adds ~15 s and tests nothing here
        "--rollout.enforce_eager", "true",
    ]
    for key, value in over.items():
        args += [f"--{key}", str(value)]
    # The fixed-concept recipe's world carries SFT captions for the ptx term (the open-world
    # demo's has none); the model is the random tiny one either way.
    return load_config(ExperimentConfig, "configs/tiny_fixed.yaml", args)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    cfg = tiny_cfg(tmp_path_factory.mktemp("driver"))
    r = train.start_run(cfg)
    yield r
    train.shutdown(r)


def same(a: dict, b: dict) -> None:
    for key in DETERMINISTIC:
        if key in a:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a[key], b[key])


def test_step_metrics_and_versions(run):
    metrics = train.training_step(run)
    run.metrics.write(metrics)
    train.save_checkpoint(run)
    assert metrics["step"] == 1 and run.version == 1
    for key in ("reward/total_mean", "reward/name_mean", "train/kl", "train/clip_frac", "train/entropy",
                "response/length_mean", "rollout/logprob_mismatch", "time/generate", "time/reward",
                "time/train", "time/sync", "perf/tokens_per_s", "train/ptx_loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # the learner recomputed the rollout's log-probs on the same weights (fp32: ~1e-5)
    assert metrics["rollout/logprob_mismatch"] < 1e-3
    if run.cfg.sampling.greedy_member:  # the recipe's greedy completion per group, reported apart
        for key in ("greedy/reward_mean", "greedy/repeated_4gram_mean", "greedy/length_mean"):
            assert math.isfinite(metrics[key]), key
    # per-worker counters aggregated over both workers with RLlib's MetricsLogger
    assert metrics["rollout/samples"] == 2 * 4 and metrics["rollout/tokens"] > 0
    # both workers now serve version 1
    assert ray.get([w.sync.remote(run.weights) for w in run.handles.rollout]) == [1, 1]
    lines = (run.out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1


def test_resumed_step_equals_uninterrupted(run):
    step2 = train.training_step(run)
    run.metrics.write(step2)
    train.save_checkpoint(run)
    # back to the end of step 1, as `repic train --resume` does, and redo step 2
    train.restore_checkpoint(run, run.out / "checkpoints" / "step_000001")
    assert run.step == 1 and run.version == 1
    again = train.training_step(run)
    run.metrics.write(again)
    assert again["step"] == 2
    same(step2, again)
    assert [json.loads(x)["step"] for x in (run.out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    train.save_checkpoint(run)


def test_killed_rollout_worker_is_restarted_and_its_work_redone(run):
    before = ray.get(run.handles.rollout[0].pid.remote())
    run.pending = train.sample_rollouts(run)  # the step's rollouts are in flight...
    ray.kill(run.handles.rollout[0], no_restart=False)  # ...when a worker dies
    metrics = train.training_step(run)  # collect_rollouts raises on any lost/duplicate sample
    run.metrics.write(metrics)
    after = ray.get(run.handles.rollout[0].pid.remote())
    assert after != before
    # the fresh process healed itself to the version published when the rollouts were
    # launched (the step's update has since published the next one)
    assert ray.get(run.handles.rollout[0].sync.remote(None)) == run.version - 1
    assert metrics["rollout/staleness"] == 0
    assert metrics["step"] == 3 and len(run.seen_uids) == 3 * run.cfg.algo.prompts_per_step


def test_killed_reward_actor_is_restarted(run):
    before = ray.get(run.handles.rewards[0].pid.remote())
    ray.kill(run.handles.rewards[0], no_restart=False)
    metrics = train.training_step(run)
    run.metrics.write(metrics)
    assert ray.get(run.handles.rewards[0].pid.remote()) != before
    assert metrics["step"] == 4


def test_killed_learner_resumes_from_last_checkpoint(run):
    train.save_checkpoint(run)  # step 4
    step5 = train.training_step(run)
    run.metrics.write(step5)
    ray.kill(run.handles.learners.actors[0])  # no restart: the group must be rebuilt
    run.cfg.trainer.steps = 6
    run.cfg.trainer.eval_before = False
    run.cfg.trainer.checkpoint_every = 0
    run.data.eval_splits = {}
    train.fit(run)  # step 6 hits the dead learner: rebuild, restore step 4, redo steps 5 and 6
    rows = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    same(step5, rows[4])
    # the trained policy is written in loadable form: merged HF checkpoint + peft adapter
    from repic_ray.models.loading import load_policy

    assert load_policy(str(run.out / "final" / "model")) is not None
    assert (run.out / "final" / "adapter" / "adapter_config.json").exists()


def test_async_mode_overlaps_generation_with_the_update(run):
    run.cfg.algo.mode = "async"
    first = train.training_step(run)  # launches its own rollouts, then the next step's
    assert run.pending is not None and run.pending.version == run.version - 1
    second = train.training_step(run)  # trains on rollouts from one version back
    assert first["rollout/staleness"] == 0 and second["rollout/staleness"] == 1
    # the second step's rollouts were collected and scored during the first step's update
    assert first["perf/score_s"] > 0 and second["perf/score_s"] > 0
    assert run.pending.scoring is not None
    train.drain_pending(run)  # the rollouts of a step that will not run
    assert run.pending is None
    run.cfg.algo.mode = "sync"


def test_full_weight_sync_reaches_every_worker(run):
    run.cfg.cluster.weight_sync = "full"
    train.training_step(run)
    assert run.weights.kind == "full"
    assert ray.get([w.sync.remote(run.weights) for w in run.handles.rollout]) == [run.version] * 2
    metrics = train.training_step(run)  # rollouts from merged full weights, learner on LoRA
    assert metrics["rollout/logprob_mismatch"] < 1e-3
    assert metrics["rollout/samples"] == run.cfg.algo.prompts_per_step * run.cfg.algo.group_size


def test_workers_go_back_to_the_base_checkpoint_and_forward_again(run):
    """What a restore to step 0 publishes (`WeightsRef.base`): a worker serving a trained
    policy goes back to the checkpoint it was built from; the next publication brings the
    policy back (a worker never keeps weights because of a version number alone)."""
    cfg, worker = run.cfg, run.handles.rollout[0]
    request = make_request("probe", run.data.train[0], run.processor, cfg.trainer.seed, cfg.algo.group_size)[0]

    def sample(weights):
        (result,) = ray.get(worker.generate.remote([request], cfg.sampling, weights))
        return [(c.token_ids, c.logprobs) for c in result.completions]

    base = WeightsRef.base(cfg.cluster.weight_sync)  # full weights: the test above switched
    on_base = sample(base)
    assert sample(run.weights) != on_base  # the policy has trained for several steps
    assert sample(base) == on_base  # reloaded from disk: the same tokens and log-probs
    train.rollout_worker_metrics(run.handles.rollout)  # probes, not training samples
