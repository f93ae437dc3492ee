"""RLOO, REINFORCE++, GSPO and CISPO (posttrain.losses.rl) against numbers computed by hand."""

import math

import pytest
import torch

from posttrain.losses import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    cispo_loss,
    group_advantages,
    grpo_advantages,
    grpo_loss,
    gspo_loss,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = torch.float64


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # group [3, 1, 2]: 3 - (1+2)/2 = 1.5, 1 - (3+2)/2 = -1.5, 2 - (3+1)/2 = 0
    # the second group of three is all equal -> exactly 0
    adv = rloo_advantages(torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 5.0]), 3)
    assert adv.tolist() == [1.5, -1.5, 0.0, 0.0, 0.0, 0.0]
    # 1 - (0 + 0 + 1)/3 = 2/3
    adv4 = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    torch.testing.assert_close(adv4, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=F64))


def test_rloo_is_dr_grpo_scaled_by_g_over_g_minus_1():
    r = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.2, 0.9, 0.1, 0.4], dtype=F64)
    torch.testing.assert_close(rloo_advantages(r, 4), grpo_advantages(r, 4, scale="none") * 4 / 3)


def test_reinforce_pp_normalises_over_the_whole_batch():
    # mean 2.5; Bessel std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    adv = reinforce_pp_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))
    s = math.sqrt(5 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], dtype=F64))


def test_reinforce_pp_baseline_centres_per_group_then_scales_by_the_batch_std():
    # centred per group: [-1, 1, 0, 0, -2, 2]; batch std (Bessel) = sqrt(10 / 5) = sqrt(2)
    adv = reinforce_pp_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0], dtype=F64), 2)
    torch.testing.assert_close(adv, torch.tensor([-1, 1, 0, 0, -2, 2], dtype=F64) / math.sqrt(2))
    # a per-group std would have given +-1 in both informative groups
    assert grpo_advantages(torch.tensor([1.0, 3.0, 2.0, 6.0]), 2).abs().tolist() == pytest.approx([0.7071] * 4, abs=1e-4)


def test_reinforce_pp_all_equal_batch_is_zero():
    assert reinforce_pp_advantages(torch.tensor([0.5, 0.5, 0.5])).tolist() == [0.0, 0.0, 0.0]
    assert reinforce_pp_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0] * 4


def test_group_advantages_by_name():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert ADVANTAGE_ESTIMATORS == ("grpo", "dr_grpo", "rloo", "reinforce_pp")
    assert group_advantages(r, 4, estimator="dr_grpo").tolist() == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages(r, 4, estimator="rloo").tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(group_advantages(r, 4), grpo_advantages(r, 4))
    with pytest.raises(ValueError, match=r"unknown estimator 'rlo'; valid: grpo, dr_grpo, rloo, reinforce_pp"):
        group_advantages(r, 4, estimator="rlo")


def _gspo_inputs():
    # log-ratio tokens: row 0 [0.1, 0.3] -> mean 0.2; row 1 [-0.2, pad]
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=F64)
    logps = (old + torch.tensor([[0.1, 0.3], [-0.2, 0.0]], dtype=F64)).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    return logps, old, torch.tensor([1.0, -1.0], dtype=F64), mask


def test_gspo_sequence_ratio_inside_the_clip_range():
    logps, old, adv, mask = _gspo_inputs()
    loss, m = gspo_loss(logps, old, adv, mask, eps_low=0.3, eps_high=0.3)
    s0, s1 = math.exp(0.2), math.exp(-0.2)
    assert loss.item() == pytest.approx(-(s0 * 1 - s1 * 1) / 2, abs=1e-12)
    assert m["clip_frac"] == 0.0
    assert m["seq_ratio"] == pytest.approx((s0 + s1) / 2, abs=1e-12)
    loss.backward()
    # d/dlogp_t of -s_i A_i / B = -A_i s_i / (B |y_i|); padding gets 0
    expected = [[-s0 / 4, -s0 / 4], [s1 / 2, 0.0]]
    torch.testing.assert_close(logps.grad, torch.tensor(expected, dtype=F64))


def test_gspo_clips_whole_sequences_at_the_paper_range():
    logps, old, adv, mask = _gspo_inputs()
    loss, m = gspo_loss(logps, old, adv, mask)  # eps 3e-4 / 4e-4
    # row 0: min(1.2214, 1.0004) * 1; row 1: min(-0.8187, -0.9997) -> both clipped, no gradient
    assert loss.item() == pytest.approx(-(1.0004 - 0.9997) / 2, abs=1e-12)
    assert m["clip_frac"] == 1.0
    loss.backward()
    assert logps.grad.abs().sum().item() == 0.0


def test_gspo_on_policy_is_minus_mean_advantage_and_checks_shapes():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    loss, _ = gspo_loss(logps, None, torch.tensor([2.0, -1.0]), torch.ones(2, 2))
    assert loss.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match=r"gspo_loss: advantages must have shape \[B\]=\(2,\) \(one per sequence\)"):
        gspo_loss(logps, None, torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="gspo_loss: beta=0.1 needs ref_logps"):
        gspo_loss(logps, None, torch.ones(2), torch.ones(2, 2), beta=0.1)


def test_gspo_kl_term_is_the_mean_of_sequence_token_means():
    logps = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    loss, m = gspo_loss(logps, None, torch.tensor([0.0], dtype=F64), torch.ones(1, 2), ref_logps=ref, beta=0.5)
    k3 = [math.exp(u) - u - 1 for u in (-0.5, 1.0)]  # u = ref - logp
    assert m["kl"] == pytest.approx(sum(k3) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 2, abs=1e-12)


def test_cispo_weights_are_clipped_and_detached():
    old = torch.tensor([[-1.5, -0.5]], dtype=F64)
    logps = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    adv = torch.tensor([2.0], dtype=F64)
    # ratios e^0.5 = 1.6487 (capped at 1 + 0.2) and e^-1.5 = 0.2231 (no lower clip with eps_low = 1)
    loss, m = cispo_loss(logps, old, adv, torch.ones(1, 2), eps_high=0.2)
    w = [1.2, math.exp(-1.5)]
    assert loss.item() == pytest.approx((-w[0] * 2 * -1.0 - w[1] * 2 * -2.0) / 2, abs=1e-12)
    assert m["clip_frac"] == 0.5
    assert m["is_weight"] == pytest.approx(sum(w) / 2, abs=1e-12)
    loss.backward()
    # the weight is a constant: the gradient is -w A / N per token, even for the clipped token
    torch.testing.assert_close(logps.grad, torch.tensor([[-w[0] * 2 / 2, -w[1] * 2 / 2]], dtype=F64))


def test_cispo_keeps_the_gradient_that_grpo_clipping_drops():
    old = torch.tensor([[-1.5]], dtype=F64)
    for fn in ("grpo", "cispo"):
        logps = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
        kw = {"eps_high": 0.2}
        loss, _ = policy_loss(fn, logps, old, torch.tensor([1.0], dtype=F64), torch.ones(1, 1), **kw)
        loss.backward()
        # grpo: ratio 1.65 > 1.2 with A > 0 -> the clipped constant is active, gradient 0; cispo: -1.2
        assert logps.grad.item() == pytest.approx({"grpo": 0.0, "cispo": -1.2}[fn], abs=1e-12)


def test_cispo_aggregations_and_per_token_advantages():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=F64)
    per_token = [[1.0, 2.0], [1.0]]  # -1 * A * logp on policy
    loss, _ = cispo_loss(logps, None, adv, mask)
    assert loss.item() == pytest.approx(4.0 / 3)
    loss, _ = cispo_loss(logps, None, adv, mask, aggregation="grpo")
    assert loss.item() == pytest.approx((1.5 + 1.0) / 2)
    loss, _ = cispo_loss(logps, None, adv, mask, aggregation="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(4.0 / (2 * 4))
    assert sum(map(sum, per_token)) == 4.0


def test_policy_loss_grpo_is_grpo_loss():
    torch.manual_seed(0)
    logps, old = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    adv, mask = torch.randn(3, dtype=F64), torch.ones(3, 4)
    loss, _ = policy_loss("grpo", logps, old, adv, mask, aggregation="dapo")
    ref = grpo_loss(logps, old, adv, mask, aggregation="dapo")
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert loss.item() == ref.item()
    assert POLICY_LOSSES == ("grpo", "gspo", "cispo")
    with pytest.raises(ValueError, match="policy_loss: unknown loss 'gpso'; valid: grpo, gspo, cispo"):
        policy_loss("gpso", logps, old, adv, mask)
