"""Rewards for GRPO: one batched signature, composable by weight.

    reward = build_reward(RewardConfig(verifiable_weight=1.0, name_weight=1.0))
    out = reward([RewardInput(completion=..., task="yes_no_name", solution="<Bo>", ...), ...])
    out.rewards_B          # (B,) total
    out.components         # {"verifiable": (B,), "name": (B,), "name/recall": (B,), ...}

Components: RePIC's verifiable rewards (`verifiable`), a name precision/recall
reward (`names`), a detector-verified recognition reward (`detector`) and a
CIDEr-D caption-quality reward (`caption`) and a description reward (`description`:
true attribute phrases, names on their own objects). Name matching is shared with the
evaluation metric through `repic_ray.matching`.
"""

from repic_ray.rewards.base import CAPTION_TASKS, TASKS, Reward, RewardInput, RewardOutput
from repic_ray.rewards.caption import CaptionReward, CaptionRewardConfig, CiderD
from repic_ray.rewards.composite import CompositeReward, RewardConfig, build_reward
from repic_ray.rewards.description import DescriptionReward, DescriptionRewardConfig
from repic_ray.rewards.detector import DetectorReward, DetectorRewardConfig
from repic_ray.rewards.names import NameReward, NameRewardConfig
from repic_ray.rewards.verifiable import VerifiableConfig, VerifiableReward

__all__ = [
    "CAPTION_TASKS",
    "TASKS",
    "CaptionReward",
    "CaptionRewardConfig",
    "CiderD",
    "CompositeReward",
    "DescriptionReward",
    "DescriptionRewardConfig",
    "DetectorReward",
    "DetectorRewardConfig",
    "NameReward",
    "NameRewardConfig",
    "Reward",
    "RewardConfig",
    "RewardInput",
    "RewardOutput",
    "VerifiableConfig",
    "VerifiableReward",
    "build_reward",
]
