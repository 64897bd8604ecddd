import math

import pytest
import torch
from torch.testing import assert_close

from repic_ray.rl.losses import (
    AGG_MODES,
    LossSettings,
    aggregate_loss,
    entropy_from_logits,
    policy_loss,
    ppo_clip_loss,
    value_loss,
)

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


# One row, six tokens covering every branch of the clipped surrogate.
#   token  ratio  A    clip 0.2/0.2, dual 3          loss    d loss / d logp
#   0      1.5   +1   clip at 1.2: -1 * 1.2           -1.2    0 (clipped)
#   1      0.5   -1   max(0.5, 0.8): clipped at 0.8    0.8    0 (clipped)
#   2      0.5   +1   max(-0.5, -0.8) = -0.5          -0.5   -A * ratio = -0.5
#   3      1.5   -1   max(1.5, 1.2) = 1.5              1.5   -A * ratio = 1.5
#   4      4.0   -1   max(4, 1.2) = 4 -> dual min(4,3) 3.0    0 (dual-clipped)
#   5      1.1   +2   inside the clip range           -2.2   -A * ratio = -2.2
RATIOS = [1.5, 0.5, 0.5, 1.5, 4.0, 1.1]
ADVS = [1.0, -1.0, 1.0, -1.0, -1.0, 2.0]


def hand_batch():
    old = t64([[-1.0, -2.0, -0.5, -3.0, -1.2, -0.7]])
    logp = (old + t64([RATIOS]).log()).detach().requires_grad_(True)
    return logp, old, t64([ADVS]), torch.ones(1, 6)


def test_ppo_clip_hand_values_and_gradients():
    logp, old, adv, mask = hand_batch()
    loss_BT, info = ppo_clip_loss(logp, old, adv, mask, dual_clip=3.0)
    assert_close(loss_BT, t64([[-1.2, 0.8, -0.5, 1.5, 3.0, -2.2]]))
    assert info["clipped"].tolist() == [[True, True, False, False, False, False]]
    assert info["dual_clipped"].tolist() == [[False, False, False, False, True, False]]
    loss_BT.sum().backward()
    assert_close(logp.grad, t64([[0.0, 0.0, -0.5, 1.5, 0.0, -2.2]]))


def test_ppo_clip_higher_and_no_dual_clip():
    logp, old, adv, mask = hand_batch()
    # clip_high 0.28 (DAPO): token 0 is clipped at 1.28 -> -1.28
    # no dual clip: token 4 keeps loss 4 and gradient -A * ratio = 4
    loss_BT, info = ppo_clip_loss(logp, old, adv, mask, clip_high=0.28)
    assert_close(loss_BT, t64([[-1.28, 0.8, -0.5, 1.5, 4.0, -2.2]]))
    loss_BT.sum().backward()
    assert_close(logp.grad, t64([[0.0, 0.0, -0.5, 1.5, 4.0, -2.2]]))
    assert not info["dual_clipped"].any()


def test_policy_loss_stats_hand_values():
    logp, old, adv, mask = hand_batch()
    loss, stats = policy_loss(logp, old, adv, mask, LossSettings(dual_clip=3.0, agg="token_mean"))
    # token mean of [-1.2, 0.8, -0.5, 1.5, 3.0, -2.2] = 1.4 / 6
    assert_close(loss, t64(1.4 / 6))
    assert_close(stats["pg_loss"], t64(1.4 / 6))
    assert_close(stats["clip_frac"], t64(2 / 6))
    assert_close(stats["dual_clip_frac"], t64(1 / 6))
    assert_close(stats["ratio_mean"], t64(sum(RATIOS) / 6))
    approx_kl = sum(r - 1 - math.log(r) for r in RATIOS) / 6
    assert_close(stats["approx_kl"], t64(approx_kl))
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    assert_close(logp.grad, t64([[0.0, 0.0, -0.5, 1.5, 0.0, -2.2]]) / 6)


def test_aggregation_modes_hand_values():
    loss_BT = t64([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # per-sequence means 2 and 4 -> (2 + 4) / 2 = 3
    assert_close(aggregate_loss(loss_BT, mask, "seq_mean_token_mean"), t64(3.0))
    # (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert_close(aggregate_loss(loss_BT, mask, "token_mean"), t64(2.5))
    # token sums 6 and 4 over max_len 4 -> (1.5 + 1.0) / 2 = 1.25
    assert_close(aggregate_loss(loss_BT, mask, "seq_mean_token_sum_norm", max_len=4), t64(1.25))
    # explicit normalizer replaces the default count: 10 / 8
    assert_close(aggregate_loss(loss_BT, mask, "token_mean", normalizer=8.0), t64(1.25))


def test_policy_loss_with_kl_hand_values():
    # ratio 1 everywhere (logp == old). Row 0 (2 tokens): A = +1, logp - ref = ln 2;
    # row 1 (1 token + pad): A = -1, logp == ref.
    #   k3 at d = ln 2: exp(-ln 2) + ln 2 - 1 = ln 2 - 0.5;  at d = 0: 0
    #   per-token loss: row 0 -1 + 0.04 (ln 2 - 0.5); row 1 +1
    #   seq_mean_token_mean: ((-1 + 0.04 (ln 2 - 0.5)) + 1) / 2 = 0.02 (ln 2 - 0.5)
    # gradient per token: -A + beta (1 - exp(ref - logp)), / seq length / B
    #   row 0: (-1 + 0.04 * 0.5) / 2 / 2 = -0.245; row 1: 1 / 1 / 2 = 0.5; pad 0
    logp = t64([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]).requires_grad_(True)
    old = logp.detach().clone()
    ref = logp.detach() - t64([[math.log(2), math.log(2), 0.0], [0.0, 0.0, 0.0]])
    adv = t64([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, LossSettings(kl_beta=0.04), ref_logprobs_BT=ref)
    assert_close(loss, t64(0.02 * (math.log(2) - 0.5)))
    # kl stat: token mean over 3 tokens = 2 (ln 2 - 0.5) / 3
    assert_close(stats["kl"], t64(2 * (math.log(2) - 0.5) / 3))
    loss.backward()
    assert_close(logp.grad, t64([[-0.245, -0.245, 0.0], [0.5, 0.0, 0.0]]))


def test_entropy_from_logits_hand_values():
    # uniform over 4 -> ln 4; two equal logits and two banned (-inf) -> ln 2;
    # logits [0, ln 3] -> p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    ninf = float("-inf")
    logits = t64([[[0.0, 0.0, 0.0, 0.0], [1.0, ninf, ninf, 1.0]]]).requires_grad_(True)
    h = entropy_from_logits(logits)
    assert_close(h, t64([[math.log(4), math.log(2)]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    two = entropy_from_logits(t64([0.0, math.log(3)]))
    assert_close(two, t64(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))


def test_entropy_bonus_in_policy_loss():
    # A = 0 so the surrogate is 0. Token 0: logits [0, 0] -> H0 = ln 2 (the maximum,
    # gradient 0); token 1: logits [0, ln 3] -> p = [1/4, 3/4],
    # H1 = -(1/4 ln 1/4 + 3/4 ln 3/4). loss = -0.01 * (H0 + H1) / 2.
    # dH/dz_i = -p_i (ln p_i + H), so d loss / d z1 = 0.01 / 2 * p_i (ln p_i + H1).
    logits = t64([[[0.0, 0.0], [0.0, math.log(3)]]]).requires_grad_(True)
    ent = entropy_from_logits(logits)
    logp = torch.zeros(1, 2, dtype=F64)
    loss, stats = policy_loss(logp, logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2),
                              LossSettings(entropy_coef=0.01), entropy_BT=ent)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(loss, t64(-0.01 * (math.log(2) + h1) / 2))
    assert_close(stats["entropy"], t64((math.log(2) + h1) / 2))
    loss.backward()
    g1 = [0.005 * p * (math.log(p) + h1) for p in (0.25, 0.75)]
    assert_close(logits.grad, t64([[[0.0, 0.0], g1]]))


def test_value_loss_hand_values():
    # clip 0.2, returns R, old values 1.0 (except the last token, old 1.0 too)
    #   V=1.5, R=2: unclipped 0.25; V_clip = 1.2 -> 0.64 -> 0.5*0.64 = 0.32, grad 0
    #   V=1.1, R=2: inside -> 0.5*0.81 = 0.405, grad V - R = -0.9
    #   V=0.5, R=0: unclipped 0.25; V_clip = 0.8 -> 0.64 -> 0.32, grad 0
    #   V=1.5, R=0: unclipped 2.25 > clipped 1.44 -> 1.125, grad 1.5
    # token_mean over 4: (0.32 + 0.405 + 0.32 + 1.125) / 4 = 2.17 / 4
    v = t64([[1.5, 1.1, 0.5, 1.5, 7.0]]).requires_grad_(True)
    old = t64([[1.0, 1.0, 1.0, 1.0, 0.0]])
    ret = t64([[2.0, 2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(v, old, ret, mask, clip=0.2)
    assert_close(loss, t64(2.17 / 4))
    assert_close(stats["vf_clip_frac"], t64(0.5))
    loss.backward()
    assert_close(v.grad, t64([[0.0, -0.9, 0.0, 1.5, 0.0]]) / 4)
    # unclipped: 0.5 * (0.25 + 0.81 + 0.25 + 2.25) / 4
    loss_u, _ = value_loss(v, old, ret, mask, clip=None)
    assert_close(loss_u, t64(0.5 * 3.56 / 4))


def test_bad_arguments_raise():
    logp, old, adv, mask = hand_batch()
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(logp, old, adv, mask, LossSettings(agg="sum"))
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, old, adv, mask, LossSettings(agg="seq_mean_token_sum_norm"))
    with pytest.raises(ValueError, match="needs ref_logprobs_BT"):
        policy_loss(logp, old, adv, mask, LossSettings(kl_beta=0.1))
    with pytest.raises(ValueError, match="needs entropy_BT"):
        policy_loss(logp, old, adv, mask, LossSettings(entropy_coef=0.1))
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, adv, mask, LossSettings(clip_low=1.0))
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, LossSettings(dual_clip=1.0))
    with pytest.raises(ValueError, match="advantages_BT shape"):
        policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="not right-padded"):
        policy_loss(logp, old, adv, torch.tensor([[1, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logp, old, adv, mask, normalizer=0.0)


# --------------------------------------------------------------- properties


def random_batch(B=6, T=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 3, T - 2, 5, 2][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 3
    # log-ratios up to +-0.6 so that plenty of tokens fall outside the clip range
    logp = old + (torch.rand(B, T, generator=gen, dtype=F64) - 0.5) * 1.2
    ref = old + (torch.rand(B, T, generator=gen, dtype=F64) - 0.5) * 0.8
    adv = torch.randn(B, T, generator=gen, dtype=F64)
    # padding holds garbage that must not matter
    pad = mask == 0
    logp = logp.masked_fill(pad, float("-inf"))
    old = old.masked_fill(pad, float("nan"))
    ref = ref.masked_fill(pad, float("-inf"))
    adv = adv.masked_fill(pad, 1e6)
    return logp, old, ref, adv, mask


def test_gradient_flows_only_where_it_should():
    logp, old, ref, adv, mask = random_batch()
    logp = logp.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    ref = ref.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(kl_beta=0.1), ref_logprobs_BT=ref)
    assert torch.isfinite(loss)
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).all()


def test_clipped_tokens_get_zero_gradient():
    logp, old, _, adv, mask = random_batch(seed=3)
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(dual_clip=1.3))
    loss.backward()
    _, info = ppo_clip_loss(logp, old, adv, mask, dual_clip=1.3)
    stopped = info["clipped"] | info["dual_clipped"]
    # the batch really exercises both clip branches and the free branch
    assert info["clipped"].sum() > 0 and info["dual_clipped"].sum() > 0
    assert (logp.grad[stopped] == 0).all()
    assert (logp.grad[~stopped & (mask == 1)] != 0).all()


def _policy_loss_loop(logp, old, ref, adv, mask, clip_low, clip_high, dual, beta, agg, max_len):
    """Plain-Python reference, one token at a time."""
    B, _T = mask.shape
    per_seq, total, n_tok = [], 0.0, 0
    for b in range(B):
        seq = 0.0
        n = int(mask[b].sum())
        for t in range(n):
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            lo = -a * ratio
            hi = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            loss = max(lo, hi)
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            d = ref[b][t] - logp[b][t]
            loss += beta * (math.exp(d) - d - 1)
            seq += loss
        total += seq
        n_tok += n
        if agg == "seq_mean_token_mean":
            per_seq.append(seq / max(n, 1))
        else:
            per_seq.append(seq / max_len)
    if agg == "token_mean":
        return total / n_tok
    return sum(per_seq) / B


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_vectorized_equals_loop(agg):
    logp, old, ref, adv, mask = random_batch(seed=5)
    kwargs = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 2.0, "kl_beta": 0.04}
    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(agg=agg, max_len=10, **kwargs), ref_logprobs_BT=ref)
    want = _policy_loss_loop(
        logp.tolist(),
        old.tolist(),
        ref.tolist(),
        adv.tolist(),
        mask,
        0.2,
        0.28,
        2.0,
        0.04,
        agg,
        10,
    )
    assert_close(loss, t64(want))


def _loss_and_grad(logp, old, ref, adv, mask, agg, normalizer=None):
    logp = logp.detach().clone().requires_grad_(True)
    settings = LossSettings(kl_beta=0.04, clip_high=0.28, agg=agg, max_len=10)
    loss, _ = policy_loss(logp, old, adv, mask, settings, ref_logprobs_BT=ref, normalizer=normalizer)
    loss.backward()
    return loss.detach(), logp.grad


def _trim(x, T):
    return x[:, :T]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_split_invariance(agg, world):
    """Equal micro-batches on `world` ranks, losses averaged as a DP learner does."""
    logp, old, ref, adv, mask = random_batch()
    full_loss, full_grad = _loss_and_grad(logp, old, ref, adv, mask, agg)

    global_tokens = int(mask.sum())
    normalizer = global_tokens / world if agg == "token_mean" else None
    rows = torch.arange(mask.shape[0]).chunk(world)
    rank_losses, grads = [], torch.zeros_like(full_grad)
    for r in rows:
        # each rank pads only to its own longest sequence
        T_r = int(mask[r].sum(1).max())
        parts = [_trim(x[r], T_r) for x in (logp, old, ref, adv, mask)]
        loss_r, grad_r = _loss_and_grad(*parts, agg, normalizer=normalizer)
        rank_losses.append(loss_r)
        # all-reduce mean of gradients
        grads[r, :T_r] += grad_r / world
    assert_close(torch.stack(rank_losses).mean(), full_loss)
    assert_close(grads, full_grad)


def test_token_mean_without_global_normalizer_is_not_split_invariant():
    # ranks hold 12 and 13 tokens (lengths [8, 1, 3] and [6, 5, 2]): local token means
    # weight the two ranks' tokens differently from the global mean
    logp, old, ref, adv, mask = random_batch()
    full_loss, _ = _loss_and_grad(logp, old, ref, adv, mask, "token_mean")
    halves = [slice(0, 3), slice(3, 6)]
    assert [int(mask[h].sum()) for h in halves] == [12, 13]
    local = torch.stack(
        [
            _loss_and_grad(*(x[h] for x in (logp, old, ref, adv, mask)), "token_mean")[0]
            for h in halves
        ]
    ).mean()
    assert not torch.isclose(local, full_loss)
