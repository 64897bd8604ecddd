"""Thin Ray adapters over the core engines.

Each remote method delegates to a plain class from `repic_ray/`; the adapters add
only what a distributed process needs: healing its own weights after a restart,
and a pid for fault-injection tests. Actors are created in `actors/roles.py`,
where `ray.remote(...)` is applied with each role's resources.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from repic_ray.rewards.base import RewardInput, RewardOutput
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import RolloutRequest, RolloutResult


@dataclass
class WeightsRef:
    """A published policy version: the learner's export, left in the object store.

    `ref` points at `(tensors, peft_config)` for `kind="lora"` or at a full state dict
    for `kind="full"`. Passing this small record (not the tensors) to every call lets a
    worker that was restarted on a fresh process fetch the current weights itself.
    """

    version: int
    kind: str
    ref: Any
    """None: the checkpoint the rollout engines were built from (version 0)."""

    @classmethod
    def base(cls, kind: str) -> WeightsRef:
        """The initial policy: what a run restored to step 0 publishes, so that workers
        still serving a later version go back to the base weights."""
        return cls(version=0, kind=kind, ref=None)

    def key(self) -> tuple[int, str | None]:
        """Identifies one publication. A version number alone does not: after a restore
        the run counts versions again from the checkpoint's, with different weights."""
        return self.version, None if self.ref is None else self.ref.hex()


def cpu_binding(index: int, num_threads: int, cpus: int) -> str:
    """vLLM's CPU list for rollout worker `index` of a node with `cpus` cores: `num_threads`
    consecutive cores (1 when 0), worker i starting where worker i - 1 ended, wrapping."""
    n = max(1, min(num_threads or 1, cpus))
    return ",".join(str((index * n + k) % cpus) for k in range(n))


class RolloutWorker:
    """A vLLM rollout engine that keeps itself at the published policy version."""

    def __init__(self, cfg: RolloutConfig, index: int = 0, num_threads: int = 0):
        from repic_ray.rollout.vllm_engine import VLLMRolloutEngine

        if not ray.get_gpu_ids() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # On CPU, vLLM's automatic binding pins every engine of a node to the same
            # core; spread the workers of a node over its cores instead, `num_threads`
            # cores each (0: one).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(index, num_threads, os.cpu_count() or 1)

        self.engine = VLLMRolloutEngine(cfg)
        self.metrics = MetricsLogger()
        self.serving: tuple[int, str | None] = (0, None)  # `WeightsRef.key()` of the base checkpoint

    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingConfig, weights: WeightsRef | None
    ) -> list[RolloutResult]:
        self.sync(weights)
        start = time.perf_counter()
        results = self.engine.generate(requests, sampling)
        completions = [c for r in results for c in r.completions]
        self.metrics.log_value("rollout/worker_generate_s", time.perf_counter() - start, reduce="sum")
        self.metrics.log_value("rollout/samples", len(completions), reduce="sum")
        self.metrics.log_value("rollout/tokens", sum(len(c.token_ids) for c in completions), reduce="sum")
        return results

    def reduce_metrics(self) -> dict:
        """This worker's metrics since the last call (for `MetricsLogger.aggregate`)."""
        return self.metrics.reduce()

    def sync(self, weights: WeightsRef | None) -> int:
        """Load `weights` unless this engine already serves that publication (None: keep
        the current weights). Returns the policy version served."""
        if weights is not None and weights.key() != self.serving:
            if weights.ref is None:
                self.engine.load_base()
            elif weights.kind == "lora":
                tensors, peft_config = ray.get(weights.ref)
                self.engine.update_lora(tensors, peft_config, weights.version)
            else:
                self.engine.update_full(ray.get(weights.ref), weights.version)
            self.serving = weights.key()
        return self.engine.policy_version

    def pid(self) -> int:
        return os.getpid()


class RewardActor:
    """Scores batches of completions with the composite reward (detector loaded once)."""

    def __init__(self, reward_cfg: Any):
        from repic_ray.rewards import build_reward

        self.reward = build_reward(reward_cfg)

    def score(self, inputs: list[RewardInput]) -> RewardOutput:
        return self.reward(inputs)

    def pid(self) -> int:
        return os.getpid()
