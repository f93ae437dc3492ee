"""posttrain.losses.preference against hand-computed values (Python floats, math module only)."""

import math

import pytest
import torch

from posttrain.losses import (
    DPO_LOSS_TYPES,
    chosen_nll,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    mismatched_indices,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
)


def t(*xs, requires_grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)


def softplus(x):  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# policy ratio chosen = +1, rejected = -1  ->  Delta = 2, beta * Delta = 0.2
PC, PR, RC, RR = t(-10.0), t(-12.0), t(-11.0), t(-11.0)


# ------------------------------------------------------------------------------------------ DPO


def test_dpo_sigmoid_hand_value_and_rewards():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(softplus(-0.2), abs=1e-12)
    assert losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_dpo_label_smoothing_is_cdpo():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=1e-12)


def test_dpo_robust_hand_value():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx((0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8, abs=1e-12)
    # eps = 0 reduces to plain DPO
    plain, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    robust0, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust")
    assert robust0.item() == pytest.approx(plain.item(), abs=1e-12)


def test_dpo_hinge_hand_value():
    losses, _, _ = dpo_loss(t(-10.0, -10.0), t(-12.0, -30.0), t(-11.0, -11.0), t(-11.0, -11.0),
                            beta=0.1, loss_type="hinge")
    # beta*Delta = 0.2 -> 0.8 ; beta*Delta = 0.1*(1+19) = 2.0 -> relu(-1) = 0
    assert losses.tolist() == pytest.approx([0.8, 0.0], abs=1e-12)


def test_ipo_uses_length_normalised_log_ratios():
    pc, rc, pr, rr = t(-10.0), t(-12.0), t(-9.0), t(-8.0)  # chosen ratio 2, rejected ratio -1
    losses, cr, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo",
                             chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    # Delta_bar = 2/4 - (-1)/2 = 1.0 ; target 1/(2*0.1) = 5 -> (1 - 5)^2
    assert losses.item() == pytest.approx(16.0, abs=1e-12)
    longer, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo",
                            chosen_lengths=torch.tensor([8]), rejected_lengths=torch.tensor([2]))
    assert longer.item() == pytest.approx((0.25 + 0.5 - 5.0) ** 2, abs=1e-12)
    # unnormalised Delta would be 3 -> (3-5)^2 = 4; the rewards stay un-normalised beta * ratio
    assert losses.item() != pytest.approx(4.0)
    assert cr.item() == pytest.approx(0.2)


def test_ipo_without_lengths_is_a_clear_error():
    with pytest.raises(ValueError, match="ipo.*chosen_lengths and rejected_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")
    with pytest.raises(ValueError, match="must all be > 0"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([1]))


def test_dpo_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown loss_type 'sigmod'; valid: sigmoid, ipo, hinge, robust"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmod")
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' or 'robust' only"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="0 <= eps < 0.5"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"policy_rejected_logps=\(2,\)"):
        dpo_loss(PC, t(-1.0, -2.0), RC, RR)


def test_dpo_at_init_is_log2_with_zero_rewards():
    pc, pr = t(-3.0, -40.0, -7.5), t(-5.0, -2.0, -100.0)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.5)
    assert losses.tolist() == pytest.approx([math.log(2.0)] * 3, abs=1e-12)
    assert cr.abs().max().item() == 0.0 and rr.abs().max().item() == 0.0


def test_dpo_rewards_are_detached():
    pc = t(-10.0, requires_grad=True)
    _, cr, rr = dpo_loss(pc, PR, RC, RR)
    assert not cr.requires_grad and not rr.requires_grad


# ------------------------------------------------------------------------------------------ KTO


def test_kto_hand_values():
    pol, ref = t(-10.0, -10.0), t(-12.0, -9.0)  # r = 2 (desirable), r = -1 (undesirable)
    losses, rewards = kto_loss(pol, ref, torch.tensor([True, False]), 0.5, beta=0.1,
                               desirable_weight=1.2, undesirable_weight=0.8)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1.2 * (1 - sig(0.1 * 1.5)), 0.8 * (1 - sig(0.1 * 1.5))], abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.2, -0.1])


def test_kto_at_init_is_half_the_weight():
    pol = t(-3.0, -8.0, -20.0)
    losses, _ = kto_loss(pol, pol.clone(), torch.tensor([1, 0, 1]), torch.tensor(0.0),
                         desirable_weight=1.33, undesirable_weight=0.7)
    assert losses.tolist() == pytest.approx([0.665, 0.35, 0.665], abs=1e-12)


def test_kto_kl_is_clamped_and_not_differentiated():
    kl = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    pol = t(-3.0, requires_grad=True)
    losses, _ = kto_loss(pol, t(-3.0), torch.tensor([True]), kl)
    assert losses.item() == pytest.approx(0.5)  # negative z treated as 0
    losses.sum().backward()
    assert kl.grad is None and pol.grad is not None


def test_kto_kl_estimate_and_mismatched_pairs():
    idx = mismatched_indices(4)
    assert idx.tolist() == [1, 2, 3, 0]
    assert (idx != torch.arange(4)).all()  # no prompt keeps its own completion
    with pytest.raises(ValueError, match="batch_size >= 2"):
        mismatched_indices(1)
    pol = t(-5.0, -7.0, -6.0, requires_grad=True)
    z = kto_kl_estimate(pol, t(-6.0, -6.5, -6.0))
    assert z.item() == pytest.approx((1.0 - 0.5 + 0.0) / 3) and not z.requires_grad
    assert kto_kl_estimate(t(-9.0, -9.0), t(-6.0, -6.0)).item() == 0.0


def test_kto_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="labels must be bool or 0/1"):
        kto_loss(t(-1.0), t(-1.0), torch.tensor([2]), 0.0)


# ----------------------------------------------------------------------------------------- ORPO


def test_orpo_hand_value():
    lc, lr, nll = -0.5, -1.5, 0.7
    log_odds = (lc - lr) - (math.log(1 - math.exp(lc)) - math.log(1 - math.exp(lr)))
    losses, lo = orpo_loss(t(lc), t(lr), t(nll), lam=0.25)
    assert lo.item() == pytest.approx(log_odds, abs=1e-12)
    assert losses.item() == pytest.approx(nll + 0.25 * softplus(-log_odds), abs=1e-12)


@pytest.mark.parametrize("lc,lr", [(-1e-8, -50.0), (-50.0, -1e-8), (-1e-8, -1e-8), (-50.0, -50.0), (0.0, -3.0)])
def test_orpo_stable_at_extremes_float32(lc, lr):
    c = torch.tensor([lc], requires_grad=True)
    r = torch.tensor([lr], requires_grad=True)
    losses, lo = orpo_loss(c, r, torch.tensor([1.0]), lam=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(lo).all()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_log1mexp_is_needed_and_accurate():
    x = torch.tensor([-1e-8, -50.0])
    naive = torch.log(1 - torch.exp(x))
    assert torch.isinf(naive[0])  # float32 1 - e^{-1e-8} rounds to 0
    assert naive[1].item() == 0.0  # and loses e^{-50} entirely
    ours = log1mexp(x)
    assert ours[0].item() == pytest.approx(math.log(1e-8), rel=1e-6)
    assert log1mexp(torch.tensor([-50.0], dtype=torch.float64)).item() == pytest.approx(-math.exp(-50.0), rel=1e-9)


# ---------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_value():
    losses, cr, rr = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5), abs=1e-12)  # 2*0.5 - 0.5 = 0.5
    assert (cr.item(), rr.item()) == pytest.approx((-2.0, -3.0))
    smooth, _, _ = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * softplus(-0.5) + 0.2 * softplus(0.5), abs=1e-12)


# --------------------------------------------------------------------------------- reward model


def test_reward_model_hand_values():
    c, r = t(1.0, 0.0), t(0.5, 2.0)
    assert reward_model_loss(c, r).tolist() == pytest.approx([softplus(-0.5), softplus(2.0)], abs=1e-12)
    assert reward_model_loss(c, r, 0.2).tolist() == pytest.approx([softplus(-0.3), softplus(2.2)], abs=1e-12)
    per_pair = reward_model_loss(c, r, t(1.0, 0.0))
    assert per_pair.tolist() == pytest.approx([softplus(0.5), softplus(2.0)], abs=1e-12)


# ------------------------------------------------------------------------------ gradient signs


def _chosen_grad(fn):
    chosen = t(-4.0, -9.0, requires_grad=True)
    fn(chosen).sum().backward()
    return chosen.grad


PREF_LOSSES = {
    **{
        f"dpo-{lt}": (lambda lt: lambda c: dpo_loss(
            c, t(-6.0, -7.0), t(-5.0, -8.0), t(-6.5, -7.5), beta=0.1, loss_type=lt,
            label_smoothing=0.1 if lt in ("sigmoid", "robust") else 0.0,
            chosen_lengths=torch.tensor([3, 5]), rejected_lengths=torch.tensor([4, 2]))[0])(lt)
        for lt in DPO_LOSS_TYPES
    },
    "kto-desirable": lambda c: kto_loss(c, t(-5.0, -8.0), torch.tensor([True, True]), 0.3)[0],
    "orpo": lambda c: orpo_loss(c / 10, t(-0.8, -1.2), t(0.5, 0.5))[0],
    "simpo": lambda c: simpo_loss(c / 10, t(-0.8, -1.2))[0],
    "reward": lambda c: reward_model_loss(c, t(-6.0, -7.0)),
}


@pytest.mark.parametrize("name", list(PREF_LOSSES))
def test_raising_chosen_logps_lowers_the_loss(name):
    grad = _chosen_grad(PREF_LOSSES[name])
    assert (grad < 0).all(), f"{name}: d loss / d chosen = {grad.tolist()}"


def test_kto_undesirable_gradient_points_the_other_way():
    grad = _chosen_grad(lambda c: kto_loss(c, t(-5.0, -8.0), torch.tensor([False, False]), 0.3)[0])
    assert (grad > 0).all()


def test_chosen_nll_is_the_per_token_nll_and_its_gradient_raises_chosen():
    logps = torch.tensor([-6.0, -2.0], requires_grad=True)
    nll = chosen_nll(logps, torch.tensor([3, 4]))
    assert torch.allclose(nll, torch.tensor([2.0, 0.5]))
    nll.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([-1 / 3, -1 / 4]))  # descent raises log pi(chosen)
    with pytest.raises(ValueError, match="chosen_nll: all inputs must have the same shape"):
        chosen_nll(torch.zeros(2), torch.ones(3))
