import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from repic_ray.rl.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)
from repic_ray.rl.masked import (
    check_right_padded,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def random_right_padded_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)


# ------------------------------------------------------------------ masked stats


def test_masked_stats_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid entries: 1, 2, 3 (NaN/inf/100 are masked out and must not leak)
    assert_close(masked_sum(x, mask), torch.tensor(6.0))
    assert_close(masked_mean(x, mask), torch.tensor(2.0))
    # per row: [1+2, 3] / [2, 1]
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    # deviations -1, 0, 1: squares sum to 2; unbiased 2/2 = 1, biased 2/3
    assert_close(masked_var(x, mask), torch.tensor(1.0))
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    # whiten: (x - 2) / sqrt(2/3) on valid entries, 0 elsewhere
    s = math.sqrt(2.0 / 3.0)
    expected = torch.tensor([[-1.0 / s, 0.0, 0.0], [1.0 / s, 0.0, 0.0]])
    assert_close(masked_whiten(x, mask, eps=0.0), expected)
    # shift_mean=False adds the mean (2) back on valid entries
    assert_close(masked_whiten(x, mask, eps=0.0, shift_mean=False), (expected + 2.0) * mask)


def test_masked_mean_empty_row_is_zero_and_var_needs_entries():
    x = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    mask = torch.tensor([[0, 0], [1, 0]])
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([0.0, 7.0]))
    with pytest.raises(ValueError, match="valid entries"):
        masked_var(x, mask)


# --------------------------------------------------------------- masks / tokens


def test_check_right_padded_lengths_and_errors():
    assert check_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [2, 3]
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        check_right_padded(torch.tensor([[1, 0, 0], [0, 1, 1]]))
    with pytest.raises(ValueError, match="row 0 has no completion token"):
        check_right_padded(torch.tensor([[0, 0], [1, 0]]))
    assert check_right_padded(torch.tensor([[0, 0]]), allow_empty=True).tolist() == [0]
    with pytest.raises(ValueError, match="other than 0/1"):
        check_right_padded(torch.tensor([[2, 0]]))


def test_token_level_rewards_on_last_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    out = token_level_rewards(torch.tensor([0.5, -1.0, 2.0]), mask)
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert_close(out, expected)
    with pytest.raises(ValueError, match="rewards_B shape"):
        token_level_rewards(torch.tensor([1.0, 2.0]), mask)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -3.0]), mask)
    assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-3.0, 0.0, 0.0]]))


def test_discounted_returns_hand():
    # row 0: reward 1 at t=2, gamma 0.5 -> [0.25, 0.5, 1]; padding -> 0
    # row 1: rewards [1, 0] (t=1 is last) -> [1 + 0.5*0, 0] = [1, 0]
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0], [1.0, 0.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = discounted_returns(r, mask, gamma=0.5)
    assert_close(out, torch.tensor([[0.25, 0.5, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- GRPO / RLOO


def test_grpo_hand_values_with_interleaved_groups():
    # group 7: rewards [1, 3, 5] -> mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    #   -> A = [-2, 0, 2] / (2 + 1e-4)
    # group -2: rewards [0, 1] -> mean 0.5, unbiased var (0.25 + 0.25) / 1 = 0.5
    #   -> A = [-0.5, 0.5] / (sqrt(0.5) + 1e-4)
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0, 5.0])
    index = torch.tensor([7, -2, 7, -2, 7])
    s = math.sqrt(0.5) + 1e-4
    expected = torch.tensor([-2 / 2.0001, -0.5 / s, 0.0, 0.5 / s, 2 / 2.0001])
    assert_close(grpo_advantages(rewards, index), expected)
    # Dr.GRPO: no std division
    expected_dr = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert_close(grpo_advantages(rewards, index, norm_by_std=False), expected_dr)


def test_grpo_equal_rewards_and_singletons_give_zero():
    # all-equal group: r - mean = 0 exactly, std 0 -> 0 / eps = 0
    # singleton group (index 3): no baseline -> 0
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.7])
    index = torch.tensor([0, 0, 0, 3])
    assert_close(grpo_advantages(rewards, index), torch.zeros(4))


def test_grpo_rejects_bad_input():
    with pytest.raises(ValueError, match=r"rewards_B\[1\] is not finite"):
        grpo_advantages(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="index_B shape"):
        grpo_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0, 0]))


def test_rloo_hand_values_and_singleton_error():
    # group [1, 3, 5]: leave-one-out baselines mean(3,5)=4, mean(1,5)=3, mean(1,3)=2
    #   -> A = [1-4, 3-3, 5-2] = [-3, 0, 3]
    # group [2, 4]: baselines 4 and 2 -> A = [-2, 2]
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])
    index = torch.tensor([0, 1, 0, 0, 1])
    assert_close(rloo_advantages(rewards, index), torch.tensor([-3.0, -2.0, 0.0, 3.0, 2.0]))
    with pytest.raises(ValueError, match=r"groups \[9\]"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 9]))


def _grpo_loop(rewards, index, eps, norm_by_std):
    out = []
    for i in range(len(rewards)):
        group = [rewards[j] for j in range(len(rewards)) if index[j] == index[i]]
        mean = sum(group) / len(group)
        if not norm_by_std:
            out.append(rewards[i] - mean)
            continue
        var = sum((g - mean) ** 2 for g in group) / (len(group) - 1) if len(group) > 1 else 0.0
        out.append((rewards[i] - mean) / (math.sqrt(var) + eps))
    return torch.tensor(out, dtype=torch.float64)


def _rloo_loop(rewards, index):
    out = []
    for i in range(len(rewards)):
        others = [rewards[j] for j in range(len(rewards)) if index[j] == index[i] and j != i]
        out.append(rewards[i] - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_and_rloo_vectorized_equal_loop(norm_by_std):
    gen = torch.Generator().manual_seed(0)
    B = 40
    index = torch.randint(0, 6, (B,), generator=gen)
    rewards = torch.randint(0, 4, (B,), generator=gen).to(torch.float64) / 3.0
    got = grpo_advantages(rewards, index, eps=1e-4, norm_by_std=norm_by_std)
    want = _grpo_loop(rewards.tolist(), index.tolist(), 1e-4, norm_by_std)
    assert_close(got, want)
    assert_close(rloo_advantages(rewards, index), _rloo_loop(rewards.tolist(), index.tolist()))


# --------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_hand_values():
    # rewards [1, 0], lengths [2, 1], gamma 1, no KL:
    #   token rewards [[0, 1], [0, pad]] -> returns [[1, 1], [0, pad]]
    #   valid returns 1, 1, 0: mean 2/3, biased var ((1/3)^2*2 + (2/3)^2)/3 = 2/9
    #   whitened: (1 - 2/3)/sqrt(2/9) = 1/sqrt(2), (0 - 2/3)/sqrt(2/9) = -sqrt(2)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = reinforce_pp_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), mask, eps=0.0)
    h = 1 / math.sqrt(2)
    assert_close(out, torch.tensor([[h, h], [-math.sqrt(2), 0.0]], dtype=torch.float64))


def test_reinforce_pp_kl_discount_and_baseline():
    # one row of 2 tokens plus a second row so that whitening is well defined.
    # row 0: R = 1, kl = [0.5, 1.0], beta 0.1, gamma 0.5
    #   token rewards [-0.05, 1 - 0.1] = [-0.05, 0.9]
    #   returns [-0.05 + 0.5 * 0.9, 0.9] = [0.4, 0.9]
    # row 1: R = 0, kl = [2.0, pad] -> token rewards [-0.2] -> returns [-0.2]
    # valid returns 0.4, 0.9, -0.2: mean 11/30
    #   deviations 1/30, 16/30, -17/30 -> biased var (1 + 256 + 289) / 900 / 3 = 546 / 2700
    mask = torch.tensor([[1, 1], [1, 0]])
    kl = torch.tensor([[0.5, 1.0], [2.0, 123.0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = reinforce_pp_advantages(rewards, mask, kl_BT=kl, kl_beta=0.1, gamma=0.5, eps=0.0)
    std = math.sqrt(546 / 2700)
    expected = torch.tensor([[1 / 30 / std, 16 / 30 / std], [-17 / 30 / std, 0.0]])
    assert_close(out, expected.to(torch.float64))
    # with index_B both rows share a group: rewards become [0.5, -0.5] first
    index = torch.tensor([0, 0])
    out_b = reinforce_pp_advantages(rewards, mask, index_B=index, eps=0.0)
    # token returns [[0.5, 0.5], [-0.5]]: mean 1/6, deviations 1/3, 1/3, -2/3,
    # biased var (1/9 + 1/9 + 4/9)/3 = 2/9 -> same whitened values as the first test
    h = 1 / math.sqrt(2)
    assert_close(out_b, torch.tensor([[h, h], [-math.sqrt(2), 0.0]], dtype=torch.float64))


# ------------------------------------------------------------------------ GAE


def test_gae_hand_values():
    # row 0 (len 2): r = [0, 1], V = [0.5, 0.2], gamma 0.9, lambda 0.5
    #   delta_1 = 1 + 0 (terminal) - 0.2 = 0.8           A_1 = 0.8
    #   delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32             A_0 = -0.32 + 0.45 * 0.8 = 0.04
    #   returns = A + V = [0.54, 1.0]; padding value 9 is ignored
    # row 1 (len 3): r = [0, 0, 1], V = 0
    #   A_2 = 1, A_1 = 0.45, A_0 = 0.45^2 = 0.2025; returns equal A
    r = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.5)
    assert_close(adv, torch.tensor([[0.04, 0.8, 0.0], [0.2025, 0.45, 1.0]]))
    assert_close(ret, torch.tensor([[0.54, 1.0, 0.0], [0.2025, 0.45, 1.0]]))


def _gae_loop(r, v, lengths, gamma, lam):
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[b][t + 1] if t + 1 < n else 0.0
            delta = r[b][t] + gamma * next_v - v[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return torch.tensor(adv, dtype=torch.float64)


def test_gae_vectorized_equals_loop():
    gen = torch.Generator().manual_seed(1)
    B, T = 6, 9
    mask = random_right_padded_mask(B, T, gen)
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv, ret = gae_advantages(r, v, mask, gamma=0.97, lam=0.9)
    want = _gae_loop(r.tolist(), v.tolist(), mask.sum(1).long().tolist(), 0.97, 0.9)
    assert_close(adv, want)
    assert_close(ret, (want + v) * mask)


def test_gae_matches_rllib_compute_value_targets():
    from ray.rllib.utils.postprocessing.value_predictions import compute_value_targets

    gen = torch.Generator().manual_seed(2)
    B, T = 5, 7
    gamma, lam = 0.95, 0.8
    mask = random_right_padded_mask(B, T, gen)
    # token rewards: outcome at the last token plus a per-token term (a KL penalty)
    rewards = token_level_rewards(torch.randn(B, generator=gen), mask)
    rewards = rewards - 0.05 * torch.rand(B, T, generator=gen) * mask
    values = torch.randn(B, T, generator=gen)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)

    # RLlib wants one flat stream of timesteps; each sequence is an episode that
    # terminates at its last real token (no bootstrap after it).
    valid = mask.bool()
    lengths = mask.sum(1).long()
    terminateds = token_level_rewards(torch.ones(B), mask)[valid].numpy()
    targets = compute_value_targets(
        values=values[valid].numpy(),
        rewards=rewards[valid].numpy(),
        terminateds=terminateds,
        truncateds=np.zeros_like(terminateds),
        gamma=gamma,
        lambda_=lam,
    )
    assert int(terminateds.sum()) == B and len(targets) == int(lengths.sum())
    assert_close(ret[valid], torch.from_numpy(targets))
    assert_close(adv[valid], torch.from_numpy(targets) - values[valid])
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


def test_gae_detaches_values_and_ignores_padding_garbage():
    mask = torch.tensor([[1, 1, 0]])
    v = torch.tensor([[0.3, 0.1, float("nan")]], requires_grad=True)
    r = torch.tensor([[0.0, 1.0, float("inf")]])
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    # gamma = lambda = 1: A_t = sum of future rewards - V_t = [1 - 0.3, 1 - 0.1]
    assert_close(adv, torch.tensor([[0.7, 0.9, 0.0]]))
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad
