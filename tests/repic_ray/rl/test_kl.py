import math

import pytest
import torch
from torch.testing import assert_close

from repic_ray.rl.kl import apply_kl_to_rewards, kl_penalty

LN2 = math.log(2.0)


def test_estimators_hand_values():
    # d = logp - ref = ln 2 (policy twice as likely as the reference), and d = 0
    #   k1 = ln 2;  k2 = 0.5 * ln2^2;  k3 = exp(-ln 2) + ln 2 - 1 = 0.5 + ln 2 - 1
    # d = -ln 2: k3 = exp(ln 2) - ln 2 - 1 = 1 - ln 2
    logp = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.3), math.log(0.5)]], dtype=torch.float64)
    assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[LN2, 0.0, -LN2]], dtype=torch.float64))
    k2 = 0.5 * LN2**2
    assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[k2, 0.0, k2]], dtype=torch.float64))
    k3 = torch.tensor([[0.5 + LN2 - 1.0, 0.0, 1.0 - LN2]], dtype=torch.float64)
    assert_close(kl_penalty(logp, ref, "k3"), k3)


def test_k1_and_k3_expectations_equal_exact_kl():
    # Over a full categorical support, E_{x~p}[k(x)] can be computed exactly:
    #   E_p[k1] = sum p log(p/q) = KL(p||q)
    #   E_p[k3] = sum p (q/p - 1 - log(q/p)) = sum q - 1 + KL = KL
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        kl = kl_penalty(p.log()[None], q.log()[None], est)[0]
        assert_close((p * kl).sum(), exact)
    # k2 is biased: its expectation differs from the KL on this example
    k2 = kl_penalty(p.log()[None], q.log()[None], "k2")[0]
    assert not torch.isclose((p * k2).sum(), exact)


def test_gradient_through_logp_only_and_k3_gradient_zero_at_equality():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5]], requires_grad=True)
    kl_penalty(logp, ref, "k3").sum().backward()
    assert ref.grad is None
    # d k3 / d logp = 1 - exp(ref - logp): 0 where logp == ref, 1 - e^0.5 at d = -0.5
    assert_close(logp.grad, torch.tensor([[0.0, 1.0 - math.exp(0.5)]]))


def test_clamp_and_overflow():
    logp = torch.tensor([[0.0, -200.0]])
    ref = torch.tensor([[-30.0, 0.0]])
    # k1 at d=30 clamped to 10; at d=-200 clamped to -10
    assert_close(kl_penalty(logp, ref, "k1", clamp=10.0), torch.tensor([[10.0, -10.0]]))
    # k3 at d = -200 would be exp(200) = inf in fp32; it stays finite
    assert torch.isfinite(kl_penalty(logp, ref, "k3")).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(logp, ref, "k1", clamp=0.0)
    with pytest.raises(ValueError, match="ref_logprobs_BT shape"):
        kl_penalty(logp, ref[:, :1], "k1")


def test_apply_kl_to_rewards_hand_values():
    # k1 per token: [ln 2, -ln 2 | pad]; beta 0.5 -> rewards [0 - 0.5 ln 2, 1 + 0.5 ln 2]
    # padding: reward and KL both 0 whatever the inputs hold
    rewards = torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64)
    logp = torch.tensor([[LN2, 0.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, LN2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    new_rewards, kl = apply_kl_to_rewards(rewards, logp, ref, mask, beta=0.5)
    assert_close(kl, torch.tensor([[LN2, -LN2, 0.0]], dtype=torch.float64))
    expected = torch.tensor([[-0.5 * LN2, 1.0 + 0.5 * LN2, 0.0]], dtype=torch.float64)
    assert_close(new_rewards, expected)
    assert not new_rewards.requires_grad and not kl.requires_grad
