"""The DeepSpeed learner: policy (+ LoRA, + optional value head) training engine.

`LearnerEngine` computes log-probs, runs GRPO / PPO / SFT steps, exports weights
(LoRA adapter or merged full weights) and checkpoints; `TrainBatch` / `SFTBatch` /
`TrainStats` are the messages in and out.
"""

from repic_ray.learner.batch import SFTBatch, TrainBatch, TrainStats, completion_mask
from repic_ray.learner.config import CriticConfig, LearnerConfig, LoraConfig, LossConfig
from repic_ray.learner.engine import LearnerEngine, ModelInputs, PolicyWithValue, token_logprobs
from repic_ray.learner.export import lora_state_dict, merged_state_dict

__all__ = [
    "CriticConfig",
    "LearnerConfig",
    "LearnerEngine",
    "LoraConfig",
    "LossConfig",
    "ModelInputs",
    "PolicyWithValue",
    "SFTBatch",
    "TrainBatch",
    "TrainStats",
    "completion_mask",
    "lora_state_dict",
    "merged_state_dict",
    "token_logprobs",
]
