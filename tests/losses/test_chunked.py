"""The chunked head against the plain path: materialised logits, log_softmax, autograd."""

import pytest
import torch

from posttrain.losses.chunked import chunked_logps, chunked_nll, default_chunk_size
from posttrain.losses.sft import target_nll

# fp32 tolerance for gradients: the fp32 softmax's sums follow the data's memory alignment (vectorised
# reductions), which moves the last bits from run to run (measured: up to 3e-6 on entries of ~0.1)
FP32 = dict(rtol=1e-4, atol=1e-5)


def _plain(h, w, y, *, bias=None, temperature=1.0, softcap=None):
    s = h @ w.t() if bias is None else h @ w.t() + bias
    s = s.float()
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    z = s / temperature
    valid = y != -100
    logp_all = torch.log_softmax(z, -1)
    logp = torch.where(valid, logp_all.gather(-1, y.clamp(min=0)[:, None])[:, 0], torch.zeros(()))
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _leaves(n=37, d=16, v=50, seed=0, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return h, w, b, y


def _grads(out, leaves):
    return torch.autograd.grad(out, [x for x in leaves if x is not None])


@pytest.mark.parametrize("chunk", [1, 4, 10, 37, 64])  # 37 rows: non-divisible for 4 and 10, one chunk at 37, 64
@pytest.mark.parametrize("bias", [False, True])
def test_logps_and_gradients_match_plain(chunk, bias):
    h, w, b, y = _leaves(bias=bias)
    g = torch.randn(h.shape[0], dtype=h.dtype)
    lp, ent = chunked_logps(h, w, y, bias=b, chunk_size=chunk)
    assert ent is None
    ref, _ = _plain(h, w, y, bias=b)
    torch.testing.assert_close(lp, ref.float(), rtol=1e-6, atol=1e-6)
    ours = _grads((lp.double() * g).sum(), [h, w, b])
    theirs = _grads((ref * g).sum(), [h, w, b])
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a.double(), t, **FP32)
    assert (lp[y == -100] == 0).all()


@pytest.mark.parametrize("temperature,softcap", [(0.7, None), (1.0, 3.0), (1.3, 2.0)])
def test_temperature_softcap_entropy_gradients(temperature, softcap):
    h, w, b, y = _leaves(seed=1, bias=True)
    g, e = torch.randn(h.shape[0], dtype=h.dtype), torch.randn(h.shape[0], dtype=h.dtype)
    lp, ent = chunked_logps(h, w, y, bias=b, temperature=temperature, softcap=softcap, with_entropy=True,
                            chunk_size=8)
    ref_lp, ref_ent = _plain(h, w, y, bias=b, temperature=temperature, softcap=softcap)
    torch.testing.assert_close(lp, ref_lp.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-5, atol=1e-5)  # fp32 softmax: lse - sum p z cancels
    ours = _grads((lp.double() * g + ent.double() * e).sum(), [h, w, b])
    theirs = _grads((ref_lp * g + ref_ent * e).sum(), [h, w, b])
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a.double(), t, **FP32)


def test_gradcheck_float64():
    h, w, b, y = _leaves(n=7, d=4, v=9, seed=2, bias=True)
    fn = lambda h, w, b: chunked_logps(h, w, y, bias=b, softcap=2.0, temperature=0.8, with_entropy=True,  # noqa: E731
                                       chunk_size=3)
    # outputs are fp32; gradcheck wants the function in float64 end to end, so compare with loose eps
    assert torch.autograd.gradcheck(lambda h, w, b: tuple(x.double() for x in fn(h, w, b)), (h, w, b),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)


def test_nll_equals_target_nll_fp32():
    h, w, _, y = _leaves(n=53, d=32, v=101, seed=3, dtype=torch.float32)
    loss, n = chunked_nll(h, w, y, chunk_size=16)
    ref, ref_n = target_nll((h @ w.t())[None], y[None])
    assert int(n) == int(ref_n) == int((y != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(gh, rh, **FP32)
    torch.testing.assert_close(gw, rw, **FP32)


def test_bf16_autocast_matches_plain_autocast():
    h, w, _, y = _leaves(n=40, d=32, v=97, seed=4, dtype=torch.float32)
    exact, _ = target_nll((h.double() @ w.double().t())[None], y[None])
    exact_grads = torch.autograd.grad(exact, [h, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_nll(h, w, y, chunk_size=16)
        ref, _ = target_nll(torch.nn.functional.linear(h, w)[None], y[None])
    # the same bf16 logits, the same fp32 softmax: equal up to the order of the sums
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    ours, plain = torch.autograd.grad(loss, [h, w]), torch.autograd.grad(ref, [h, w])
    for a, p, x in zip(ours, plain, exact_grads):
        assert a.dtype == p.dtype == torch.float32
        # bf16 rounds per chunk here and once over all rows there: the same size of error against fp64
        err, err_plain = float((a - x).norm() / x.norm()), float((p - x).norm() / x.norm())
        assert err < 1e-2 and err < 1.5 * err_plain + 1e-3, (err, err_plain)


def test_frozen_head_and_detached_entropy_give_only_h_gradient():
    h, w, _, y = _leaves(n=12, dtype=torch.float32)
    w = w.detach()
    lp, ent = chunked_logps(h, w, y, with_entropy=True, chunk_size=5)
    (gh,) = torch.autograd.grad(lp.sum() + ent.detach().sum(), [h])
    ref, _ = _plain(h, w, y)
    (rh,) = torch.autograd.grad(ref.sum(), [h])
    torch.testing.assert_close(gh, rh, **FP32)


@pytest.mark.parametrize("temperature,softcap,entropy_grad", [(1.0, None, False), (0.7, 3.0, True), (1.2, None, True)])
def test_frozen_head_gradient_taken_in_forward(temperature, softcap, entropy_grad):
    # a frozen head takes d log p / d h in the forward; an entropy gradient is still recomputed
    h, w, b, y = _leaves(n=29, seed=6, bias=True)
    w, b = w.detach(), b.detach()
    g, e = torch.randn(h.shape[0], dtype=h.dtype), torch.randn(h.shape[0], dtype=h.dtype)
    lp, ent = chunked_logps(h, w, y, bias=b, temperature=temperature, softcap=softcap, with_entropy=True,
                            chunk_size=6)
    ref_lp, ref_ent = _plain(h, w, y, bias=b, temperature=temperature, softcap=softcap)
    out, ref = lp.double() * g, ref_lp * g
    if entropy_grad:
        out, ref = out + ent.double() * e, ref + ref_ent * e
    (gh,) = torch.autograd.grad(out.sum(), [h])
    (rh,) = torch.autograd.grad(ref.sum(), [h])
    torch.testing.assert_close(gh.double(), rh, **FP32)


def test_frozen_head_bf16_autocast():
    h, w, _, y = _leaves(n=40, d=32, v=97, seed=7, dtype=torch.float32)
    w = w.detach()
    exact, _ = target_nll((h.double() @ w.double().t())[None], y[None])
    (x,) = torch.autograd.grad(exact, [h])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_nll(h, w, y, chunk_size=16)
        ref, _ = target_nll(torch.nn.functional.linear(h, w)[None], y[None])
    (a,) = torch.autograd.grad(loss, [h])
    (p,) = torch.autograd.grad(ref, [h])
    assert a.dtype == torch.float32
    err, err_plain = float((a - x).norm() / x.norm()), float((p - x).norm() / x.norm())
    assert err < 1e-2 and err < 1.5 * err_plain + 1e-3, (err, err_plain)


def test_default_chunk_and_errors():
    assert default_chunk_size(151_936) == 55
    assert default_chunk_size(10) == 2 ** 23 // 10
    h, w, _, y = _leaves(n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"h must be \[N, d\] and weight \[V, d\], got \(4, 16\) and \(50, 8\)"):
        chunked_logps(h, w[:, :8], y)
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[4\], got \(3,\)"):
        chunked_logps(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        chunked_logps(h, w, y, temperature=0)


@pytest.mark.slow  # torch.compile of the chunk functions: ~30 s of inductor compilation on 2 cores
def test_compiled_chunks_match_eager():
    h, w, b, y = _leaves(n=37, d=16, v=50, seed=5, bias=True, dtype=torch.float32)
    e = torch.randn(h.shape[0])
    out = {}
    for compile in (False, True):
        lp, ent = chunked_logps(h, w, y, bias=b, softcap=3.0, temperature=0.9, with_entropy=True, chunk_size=8,
                                compile=compile)
        out[compile] = (lp, ent, *torch.autograd.grad((lp + ent * e).sum(), [h, w, b]))
    for a, c in zip(out[False], out[True]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
