"""posttrain.losses.rl against hand-computed values and hand-unrolled loops."""

import math

import pytest
import torch

from posttrain.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
    zero_variance_groups,
)

F64 = torch.float64


def gae_by_hand(rewards, values, n, gamma, lam):
    """Direct sum A_t = sum_k (gamma lam)^k delta_{t+k} over the first n steps, V_n = 0."""
    v = list(values[:n]) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_hand_unrolled_sum(gamma, lam):
    rewards = [[0.1, -0.2, 0.0, 1.5, 0.3], [0.0, 0.4, 2.0, 9.0, 9.0]]
    values = [[0.5, 0.2, -0.1, 0.7, 0.4], [1.0, -1.0, 0.3, 9.0, 9.0]]
    lengths = [5, 3]  # row 2 is right-padded: its 9.0s must not leak in
    mask = torch.tensor([[i < n for i in range(5)] for n in lengths])
    adv, ret = gae(torch.tensor(rewards, dtype=F64), torch.tensor(values, dtype=F64), mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        want_a, want_r = gae_by_hand(rewards[b], values[b], n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want_a, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx(want_r, abs=1e-12)
        assert adv[b, n:].abs().sum().item() == 0.0 and ret[b, n:].abs().sum().item() == 0.0


def test_gae_two_steps_closed_form_and_left_padding():
    r0, r1, v0, v1, g, l = 0.3, 1.0, 0.2, 0.6, 0.9, 0.8
    a1 = r1 - v1
    a0 = r0 + g * v1 - v0 + g * l * a1
    right, _ = gae(torch.tensor([[r0, r1, 0.0]], dtype=F64), torch.tensor([[v0, v1, 5.0]], dtype=F64),
                   torch.tensor([[1, 1, 0]]), gamma=g, lam=l)
    left, _ = gae(torch.tensor([[7.0, r0, r1]], dtype=F64), torch.tensor([[5.0, v0, v1]], dtype=F64),
                  torch.tensor([[0, 1, 1]]), gamma=g, lam=l)
    assert right[0, :2].tolist() == pytest.approx([a0, a1], abs=1e-12)
    assert left[0].tolist() == pytest.approx([0.0, a0, a1], abs=1e-12)


def test_ppo_clip_fraction_on_crafted_tokens():
    # ratio e^.5 with A=+1 -> clipped active; e^-.5 with A=+1 -> not; e^.5 with A=-1 -> not;
    # e^-.5 with A=-1 -> clipped active; ratio 1 -> not; last token is padding with a wild ratio.
    logps = torch.tensor([[0.5, -0.5, 0.5, -0.5, 0.0, 30.0]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.5, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, m = ppo_policy_loss(logps, torch.zeros_like(logps), adv, mask, clip=0.2)
    assert m["clip_frac"] == pytest.approx(2 / 5)
    e, ie = math.exp(0.5), math.exp(-0.5)
    assert loss.item() == pytest.approx((-1.2 - ie + e + 0.8 - 0.5) / 5, abs=1e-12)
    loss.backward()
    g = logps.grad[0].tolist()
    assert g[0] == 0.0 and g[3] == 0.0 and g[5] == 0.0  # clipped and padded tokens give no gradient
    assert g[1] == pytest.approx(-ie / 5) and g[2] == pytest.approx(e / 5)


def test_ppo_value_loss_takes_the_larger_error():
    values = torch.tensor([[0.5, -0.1, 3.0]], dtype=F64)
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    returns = torch.tensor([[1.0, -0.5, 0.0]], dtype=F64)
    loss = ppo_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip=0.2)
    # token 0: max(0.25, (0.2-1)^2 = 0.64); token 1: max(0.16, 0.16); token 2 is padding
    assert loss.item() == pytest.approx((0.64 + 0.16) / 2 / 2, abs=1e-12)


def test_grpo_advantages_hand_values_and_zero_variance_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected
    want = 0.5 / (std + 1e-4)
    assert adv[:4].tolist() == pytest.approx([want, -want, -want, want], rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4
    assert grpo_advantages(rewards, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5] + [0.0] * 4)
    # 0.1 is not exact in binary: the mean leaves a residue, which must not become an advantage
    assert grpo_advantages(torch.tensor([0.1, 0.1, 0.1]), 3).tolist() == [0.0, 0.0, 0.0]
    assert zero_variance_groups(rewards, 4).tolist() == [False, True]


def test_grpo_advantages_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown scale 'std'; valid: group, none"):
        grpo_advantages(torch.zeros(4), 2, scale="std")


def _two_unequal_sequences():
    # seq 0: 1 token with A = +1 ; seq 1: 3 tokens with A = -1 ; on-policy, so l_t = -A
    logps = torch.full((2, 4), -1.0, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    return logps, mask, torch.tensor([1.0, -1.0], dtype=F64)


def test_grpo_aggregations_weigh_lengths_differently():
    logps, mask, adv = _two_unequal_sequences()
    got = {agg: grpo_loss(logps, None, adv, mask, aggregation=agg)[0].item() for agg in ("grpo", "dr_grpo", "dapo")}
    assert got["grpo"] == pytest.approx((-1.0 + 1.0) / 2)  # each sequence weighs the same
    assert got["dapo"] == pytest.approx((-1.0 + 3.0) / 4)  # each token weighs the same
    assert got["dr_grpo"] == pytest.approx((-1.0 + 3.0) / (2 * 4))  # constant denominator B * T
    assert grpo_loss(logps, None, adv, mask, aggregation="dr_grpo", max_completion_length=8)[0].item() == (
        pytest.approx(2.0 / 16)
    )
    with pytest.raises(ValueError, match="unknown aggregation 'mean'; valid: grpo, dr_grpo, dapo"):
        grpo_loss(logps, None, adv, mask, aggregation="mean")


def test_grpo_asymmetric_clipping_and_kl_term():
    logps = torch.tensor([[0.5, -0.5]], dtype=F64)
    old = torch.zeros_like(logps)
    mask = torch.tensor([[1, 1]])
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    loss, _ = grpo_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="dapo")
    # token 0: -min(e^.5, 1.28) = -1.28 ; token 1: -min(-e^-.5, -0.8) = 0.8
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2, abs=1e-12)
    ref = logps - 0.3
    with_kl, _ = grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=0.5, eps_low=0.2, eps_high=0.28, aggregation="dapo")
    k3 = math.exp(-0.3) + 0.3 - 1.0
    assert with_kl.item() == pytest.approx(loss.item() + 0.5 * k3, abs=1e-12)
    with pytest.raises(ValueError, match="beta=0.5 needs ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.5)


def test_kl_estimators_hand_values_and_k3_nonnegative():
    lp, ref = torch.tensor([0.3], dtype=F64), torch.tensor([0.0], dtype=F64)
    assert kl_penalty(lp, ref, estimator="k1").item() == pytest.approx(0.3)
    assert kl_penalty(lp, ref, estimator="k2").item() == pytest.approx(0.045)
    assert kl_penalty(lp, ref, estimator="k3").item() == pytest.approx(math.exp(-0.3) + 0.3 - 1, abs=1e-15)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert (kl_penalty(a, b) >= 0).all()
    assert kl_penalty(a, a.clone()).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="unknown estimator 'k4'; valid: k1, k2, k3"):
        kl_penalty(a, b, estimator="k4")


def test_whiten_and_masked_mean_ignore_padding():
    vals = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 1e6, 1e6, 1e6]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert masked_mean(vals, mask).item() == pytest.approx(2.5)
    assert masked_mean(vals, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    w = whiten(vals, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var().item() == pytest.approx(1.0, abs=1e-6)  # unbiased, like the statistic used
    assert w[~mask.bool()].abs().sum().item() == 0.0
    assert whiten(vals, mask, shift_mean=False)[mask.bool()].mean().item() == pytest.approx(2.5)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 100.0
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    assert h[0, 0].item() == pytest.approx(math.log(8), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_token_rewards_place_score_on_last_real_token():
    kl = torch.full((2, 4), 0.5, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    r = token_rewards(torch.tensor([2.0, -1.0], dtype=F64), kl, mask, kl_coef=0.1)
    assert r.flatten().tolist() == pytest.approx([-0.05, 1.95, 0, 0, 0, -0.05, -0.05, -1.05])


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 4.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret.clone(), ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask).item() == pytest.approx(0.0, abs=1e-12)
    # residual [0, 0, 1]: Var = 1/3 ; Var[R] = 7/3  ->  1 - 1/7
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=F64)
    assert explained_variance(values, ret, mask).item() == pytest.approx(6 / 7, abs=1e-12)


def test_inf_log_probs_on_padding_leave_loss_and_gradients_finite():
    logps = torch.tensor([[-1.0, -0.5, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4, float("-inf")]])
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([[1.0, -1.0, float("nan")]])
    pl, _ = ppo_policy_loss(logps, old, adv, mask)
    gl, _ = grpo_loss(logps, old, torch.tensor([1.0]), mask, ref_logps=old, beta=0.1)
    (pl + gl).backward()
    assert torch.isfinite(pl) and torch.isfinite(gl)
    assert torch.isfinite(logps.grad).all() and logps.grad[0, 2].item() == 0.0
