"""Placement and creation of every role: rollout workers, reward actors, learners.

Each role gets its own placement group (one bundle per actor, the role's resources
per bundle), so N rollout workers, M reward actors and K learners scale
independently and land on the nodes their resources demand.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.workers import RewardActor, RolloutWorker, WeightsRef
from repic_ray.learner.batch import SFTBatch, TrainBatch, TrainStats
from repic_ray.learner.config import LearnerConfig
from repic_ray.pipeline.config import ExperimentConfig, RoleResources
from repic_ray.pipeline.experience import pad_right
from repic_ray.ports import free_port


def _bundle(res: RoleResources, gpus_per_actor: float | None = None) -> dict[str, float]:
    bundle = {"CPU": res.num_cpus, **res.resources}
    gpus = res.num_gpus if gpus_per_actor is None else gpus_per_actor
    if gpus:
        bundle["GPU"] = gpus
    return {k: v for k, v in bundle.items() if v}


def _role_group(res: RoleResources, count: int, strategy: str, name: str, gpus: float | None = None,
                timeout_s: float = 600.0):
    """Reserve one bundle per actor of a role; fail clearly if the cluster cannot place them."""
    bundle = _bundle(res, gpus)
    pg = placement_group([bundle for _ in range(count)], strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"role {name!r}: {count} x {bundle} ({strategy}) could not be placed within {timeout_s:.0f} s; "
            f"cluster total {ray.cluster_resources()}, available {ray.available_resources()}"
        ) from None
    return pg


def role_threads(res: RoleResources) -> int:
    """CPU threads of each actor of a role: `num_threads`, else one per reserved CPU (at least one)."""
    return res.num_threads or max(1, math.floor(res.num_cpus))


def _thread_env(res: RoleResources) -> dict[str, Any]:
    """The actor's runtime env: OMP_NUM_THREADS = `role_threads(res)`, read by torch when the
    process starts. Ray sets one thread per reserved CPU too, but only where the environment
    that started the cluster has no OMP_NUM_THREADS: a shell's OMP_NUM_THREADS=16 would give
    every actor of a node 16 threads."""
    return {"env_vars": {"OMP_NUM_THREADS": str(role_threads(res))}}


def _in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=True
    )


def create_rollout_workers(cfg: ExperimentConfig) -> tuple[list[Any], PlacementGroup]:
    """N vLLM workers; each reserves `rollout.num_gpus x tensor_parallel_size` GPUs."""
    res = cfg.cluster.rollout
    gpus = res.num_gpus * cfg.rollout.tensor_parallel_size
    pg = _role_group(res, cfg.cluster.num_rollout_workers, cfg.cluster.placement_strategy, "rollout", gpus,
                     cfg.cluster.placement_timeout_s)
    cls = ray.remote(RolloutWorker)
    workers = [
        cls.options(
            num_cpus=res.num_cpus,
            num_gpus=gpus,
            resources=res.resources or None,
            max_restarts=cfg.cluster.max_actor_restarts,
            max_task_retries=-1,
            scheduling_strategy=_in_bundle(pg, i),
            runtime_env=_thread_env(res),
        ).remote(cfg.rollout, index=i, num_threads=res.num_threads)
        for i in range(cfg.cluster.num_rollout_workers)
    ]
    return workers, pg


def create_reward_actors(cfg: ExperimentConfig) -> tuple[list[Any], PlacementGroup]:
    res = cfg.cluster.reward
    pg = _role_group(res, cfg.cluster.num_reward_actors, cfg.cluster.placement_strategy, "reward",
                     timeout_s=cfg.cluster.placement_timeout_s)
    cls = ray.remote(RewardActor)
    actors = [
        cls.options(
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            resources=res.resources or None,
            max_restarts=cfg.cluster.max_actor_restarts,
            max_task_retries=-1,
            scheduling_strategy=_in_bundle(pg, i),
            runtime_env=_thread_env(res),
        ).remote(cfg.reward)
        for i in range(cfg.cluster.num_reward_actors)
    ]
    return actors, pg


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Node IP and a free port on the node that will host learner rank 0."""
    return ray.util.get_node_ip_address(), free_port()


def mean_stats(stats: list[TrainStats]) -> TrainStats:
    """Rank stats -> one record (token counts summed, everything else averaged)."""
    out = {}
    for f in fields(TrainStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name == "tokens":
            out[f.name] = int(sum(values))
        elif f.name == "policy_version":
            out[f.name] = int(max(values))
        else:
            out[f.name] = float(sum(values) / len(values))
    return TrainStats(**out)


class LearnerGroup:
    """K data-parallel DeepSpeed learner ranks (gloo on CPU, NCCL on GPU).

    Every collective call (train, export, checkpoint) is sent to all ranks at once;
    each rank gets an equal shard of the batch, so averaging rank gradients equals
    the full-batch gradient.
    """

    def __init__(self, cfg: LearnerConfig, num: int, res: RoleResources, strategy: str, port: int = 0,
                 timeout_s: float = 600.0):
        self.cfg = cfg
        self.num = num
        self.pg = _role_group(res, num, strategy, "learner", timeout_s=timeout_s)
        addr, found_port = ray.get(_rendezvous_address.options(scheduling_strategy=_in_bundle(self.pg, 0)).remote())
        from repic_ray.learner.engine import LearnerEngine

        cls = ray.remote(LearnerEngine)
        # All ranks are constructed together: their process groups rendezvous in __init__.
        self.actors = [
            cls.options(
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources=res.resources or None,
                scheduling_strategy=_in_bundle(self.pg, rank),
                runtime_env=_thread_env(res),
            ).remote(cfg, rank=rank, world_size=num, master_addr=addr, master_port=port or found_port)
            for rank in range(num)
        ]
        ray.get([a.__ray_ready__.remote() for a in self.actors])

    def _shards(self, batch):
        if len(batch) % self.num:
            raise ValueError(f"batch of {len(batch)} does not split evenly over {self.num} learners")
        per = len(batch) // self.num
        return [batch.select(list(range(r * per, (r + 1) * per))) for r in range(self.num)]

    def _gather_BT(self, refs: list, width: int) -> torch.Tensor:
        rows: list[list[float]] = []
        for t in ray.get(refs):
            rows.extend(t.tolist())
        return pad_right(rows, width)

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        width = batch.old_logprobs_BT.shape[1]
        return self._gather_BT([a.compute_logprobs.remote(s) for a, s in zip(self.actors, self._shards(batch))], width)

    def compute_ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        width = batch.old_logprobs_BT.shape[1]
        return self._gather_BT(
            [a.compute_ref_logprobs.remote(s) for a, s in zip(self.actors, self._shards(batch))], width
        )

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        width = batch.old_logprobs_BT.shape[1]
        return self._gather_BT([a.compute_values.remote(s) for a, s in zip(self.actors, self._shards(batch))], width)

    def train_step(self, batch: TrainBatch, ptx: SFTBatch | None = None, ptx_coef: float = 0.0) -> TrainStats:
        ptx_shards = self._shards(ptx) if ptx is not None else [None] * self.num
        return mean_stats(ray.get([a.train_step.remote(s, p, ptx_coef)
                                   for a, s, p in zip(self.actors, self._shards(batch), ptx_shards)]))

    def sft_step(self, batch: SFTBatch) -> TrainStats:
        return mean_stats(ray.get([a.sft_step.remote(s) for a, s in zip(self.actors, self._shards(batch))]))

    def export(self, kind: str, version: int) -> WeightsRef:
        """Publish the current policy; the tensors stay in the object store (rank 0's copy)."""
        refs = [a.export_lora.remote() if kind == "lora" else a.export_full.remote() for a in self.actors]
        ray.wait(refs, num_returns=len(refs))  # collective under ZeRO-3: every rank takes part
        return WeightsRef(version=version, kind=kind, ref=refs[0])

    def save(self, path: str) -> None:
        ray.get([a.save_checkpoint.remote(path) for a in self.actors])

    def load(self, path: str) -> None:
        ray.get([a.load_checkpoint.remote(path) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)

