"""Rollout engines: sample completions (with per-token log-probs) from the current policy.

`VLLMRolloutEngine` (vLLM, the production path) and `HFRolloutEngine` (transformers
`generate`, for comparison and machines without vLLM) share one interface:
`generate(requests, sampling) -> list[RolloutResult]`, `update_lora(...)`, `update_full(...)`.
"""

from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import Completion, RolloutRequest, RolloutResult

__all__ = [
    "Completion",
    "RolloutConfig",
    "RolloutRequest",
    "RolloutResult",
    "SamplingConfig",
]
