"""posttrain.losses.distill against a direct computation over probabilities (float64 loops)."""

import math

import pytest
import torch

from posttrain.losses.distill import DIVERGENCES, distill_loss, token_divergence

F64 = torch.float64


def _direct(s_logits, t_logits, divergence, beta=0.5, temperature=1.0):
    """The textbook sums over the vocabulary, one position at a time, from softmax probabilities."""
    out = []
    for zs, zt in zip(s_logits.reshape(-1, s_logits.shape[-1]).tolist(), t_logits.reshape(-1, t_logits.shape[-1]).tolist()):
        S = [math.exp(z / temperature) for z in zs]
        P = [math.exp(z / temperature) for z in zt]
        S, P = [x / sum(S) for x in S], [x / sum(P) for x in P]

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

        if divergence == "reverse_kl":
            out.append(kl(S, P))
        elif divergence == "forward_kl":
            out.append(kl(P, S))
        else:
            M = [beta * p + (1 - beta) * s for p, s in zip(P, S)]
            out.append(beta * kl(P, M) + (1 - beta) * kl(S, M))
    return torch.tensor(out, dtype=F64).reshape(s_logits.shape[:-1])


@pytest.mark.parametrize("divergence,beta,temperature", [("reverse_kl", 0.5, 1.0), ("forward_kl", 0.5, 1.0),
                                                         ("jsd", 0.5, 1.0), ("jsd", 0.1, 1.0), ("jsd", 0.9, 2.0),
                                                         ("reverse_kl", 0.5, 0.7)])
def test_token_divergence_equals_the_direct_sum(divergence, beta, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11, dtype=F64) * 2, torch.randn(2, 3, 11, dtype=F64) * 2
    got = token_divergence(s, t, divergence=divergence, beta=beta, temperature=temperature)
    torch.testing.assert_close(got, _direct(s, t, divergence, beta, temperature), rtol=1e-10, atol=1e-12)
    assert (got > 0).all()
    # log-probs in place of logits give the same numbers (log_softmax is idempotent)
    torch.testing.assert_close(token_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                divergence=divergence, beta=beta), _direct(s, t, divergence, beta))


def test_forward_kl_matches_torch_kl_div_and_identical_distributions_give_zero():
    torch.manual_seed(1)
    s, t = torch.randn(4, 7, dtype=F64), torch.randn(4, 7, dtype=F64)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                     reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(s, t, divergence="forward_kl"), ref)
    for d in DIVERGENCES:
        assert token_divergence(s, s + 3.0, divergence=d).abs().max().item() < 1e-12  # a shift changes nothing


def test_distill_loss_sums_masked_tokens_and_only_the_student_gets_a_gradient():
    torch.manual_seed(2)
    s = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = distill_loss(s, t, mask)
    d = _direct(s.detach(), t.detach(), "reverse_kl")
    assert loss.item() == pytest.approx((d[0, 0] + d[0, 1] + d[1, 0]).item(), rel=1e-12)
    assert m["tokens"] == 3 and m["divergence"] == pytest.approx(loss.item() / 3, rel=1e-12)
    loss.backward()
    assert t.grad is None and s.grad[mask == 0].abs().sum() == 0 and s.grad[mask == 1].abs().sum() > 0
    # d KL(S||P) / d z_s = S * (log S - log P - KL): the analytic gradient at one position
    S, lS, lP = torch.softmax(s[0, 0].detach(), -1), torch.log_softmax(s[0, 0].detach(), -1), torch.log_softmax(t[0, 0].detach(), -1)
    torch.testing.assert_close(s.grad[0, 0], S * (lS - lP - d[0, 0]))


def test_zero_probability_tokens_do_not_poison_the_gradient():
    s = torch.tensor([[0.0, 1.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([[0.5, 0.5, 0.0]])
    loss, _ = distill_loss(s, t, torch.ones(1))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()


def test_clear_errors():
    s = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="the student's vocabulary has 5 entries and the teacher's 6; "
                                         "distillation needs one shared tokenizer"):
        token_divergence(s, torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="unknown divergence 'kl'; valid: reverse_kl, forward_kl, jsd"):
        token_divergence(s, s, divergence="kl")
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        token_divergence(s, s, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but the logits have \(1, 2\) positions"):
        distill_loss(s, s, torch.ones(2))
