"""Tests for repic_ray/pipeline/experience.py."""

import pytest
import torch

from repic_ray.pipeline.experience import compute_advantages, pad_right


def test_pad_right():
    out = pad_right([[1.0, 2.0], [3.0]])
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))


def test_grpo_broadcasts_group_normalized_reward_over_real_tokens():
    # group 0 rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70711
    # a = (+-0.5) / (0.70711 + 1e-4) = +-0.70701; group 1 all equal -> 0.
    rewards_B = torch.tensor([1.0, 0.0, 2.0, 2.0])
    index_B = torch.tensor([0, 0, 1, 1])
    mask_BT = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.float32)
    a_BT, returns = compute_advantages("grpo", rewards_B, index_B, mask_BT)
    assert returns is None
    a = 0.5 / (0.5 ** 0.5 + 1e-4)
    torch.testing.assert_close(a_BT, torch.tensor([[a, a], [-a, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_drgrpo_skips_std():
    rewards_B = torch.tensor([1.0, 0.0])
    a_BT, _ = compute_advantages("drgrpo", rewards_B, torch.tensor([0, 0]), torch.ones(2, 1))
    torch.testing.assert_close(a_BT, torch.tensor([[0.5], [-0.5]]))


def test_unknown_estimator_and_gae_without_values():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("nope", torch.zeros(2), torch.zeros(2), torch.ones(2, 1))
    with pytest.raises(ValueError, match="values_BT"):
        compute_advantages("gae", torch.zeros(2), torch.zeros(2), torch.ones(2, 1))
