"""Rollout workers scale independently: one run config, its prompts spread over 1, 2, 4
vLLM workers, the same seeded completions from each layout. Slow (4 engines)."""

from __future__ import annotations

import pytest
import ray

from actors import roles
from recipes import train
from repic_ray.config import load_config
from repic_ray.models.loading import load_processor
from repic_ray.pipeline.config import ExperimentConfig
from repic_ray.pipeline.episodes import load_run_data, make_request

pytestmark = pytest.mark.slow


def test_one_two_four_rollout_workers_give_identical_seeded_rollouts(ray_local, tmp_path):
    cfg = load_config(ExperimentConfig, "configs/tiny_cpu.yaml", [
        "--learner.model", "tiny:qwen2.5-vl", "--cluster.num_rollout_workers", "4",
        "--cluster.rollout.num_cpus", "0.5", "--sampling.max_tokens", "16", "--algo.group_size", "2",
        "--rollout.kv_cache_gib", "0.25", "--rollout.enforce_eager", "true",
        "--trainer.output_dir", str(tmp_path),
    ])
    cfg = train.prepare_config(cfg)
    data = load_run_data(cfg.data)
    proc = load_processor(cfg.rollout.model)
    requests = [make_request(f"0:{i}", s, proc, seed=0, n=2)[0] for i, s in enumerate(data.train[:8])]
    workers, pg = roles.create_rollout_workers(cfg)
    try:
        outputs = {}
        for n in (1, 2, 4):
            refs = train.launch_rollouts(workers[:n], requests, cfg.sampling, None)
            assert len(refs) == n  # every worker of the layout got a share of the prompts
            results = train.collect_rollouts(refs, requests)
            outputs[n] = {uid: [c.token_ids for c in r.completions] for uid, r in results.items()}
            counters = train.rollout_worker_metrics(workers[:n])
            assert counters["rollout/samples"] == 2 * len(requests)
        assert outputs[1] == outputs[2] == outputs[4]
        assert len({pid for pid in ray.get([w.pid.remote() for w in workers])}) == 4
    finally:
        for w in workers:
            ray.kill(w)
        ray.util.remove_placement_group(pg)
