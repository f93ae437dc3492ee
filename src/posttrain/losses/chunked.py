"""Log-probs, NLL and entropy of a linear output head, a chunk of rows at a time.

With a 128k-152k-row vocabulary the logits, not the model body, decide peak memory: 4k loss
tokens × 151,936 rows is 2.5 GB per fp32 copy, and the plain path holds several (the logits, their
fp32 cast, the log-softmax, its gradient). Here the head runs over `chunk_size` rows at a time, in
the forward and again in the backward (the chunk's logits are recomputed there, not stored), so
at most one chunk of [chunk_size, V] logits and a few same-sized temporaries are alive at once.
The idea is Liger-Kernel's fused linear cross-entropy and Wijmans et al. 2024 ("Cut Your Losses
in Large-Vocabulary Language Models"), written in plain PyTorch.

For hidden states h [N, d] at the loss positions, the head W [V, d] (bias b [V], optional), the
final-logit softcap c (Gemma-2; none: identity) and the temperature τ:

    s = h Wᵀ + b                              raw logits, [N, V]
    z = softcap_c(s) / τ,   softcap_c(s) = c · tanh(s / c)
    log p_i = z_{i, y_i} − logsumexp_j z_{i, j}
    H_i     = logsumexp_j z_{i, j} − Σ_j p_{i, j} z_{i, j}          (entropy)

Backward, per chunk, from the upstream gradients g (of log p) and e (of H):

    ∂/∂z_{ij} = g_i (1[j = y_i] − p_ij) − e_i p_ij (log p_ij + H_i)
    ∂/∂s      = ∂/∂z / τ · (1 − tanh²(s / c))
    ∂/∂h = (∂/∂s) W,   ∂/∂W = (∂/∂s)ᵀ h,   ∂/∂b = Σ_i ∂/∂s_i

With a frozen head (LoRA, prompt tuning: no gradient for W or b) only ∂/∂h is needed, and the
forward keeps ∂ log p_i/∂h_i = (∂/∂s_i with g = 1) W, [N, d], from the logits it already has; the
backward is then g_i times that row, with no recomputation (an entropy gradient is still recomputed).
That is the plain path's number of head matmuls (two) instead of three.

Rows whose target is IGNORE_INDEX get log p = 0 and no gradient. Under autocast the matmuls run
in the autocast dtype (as the plain `F.linear` would) and the softmax in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100

# fp32 elements per [chunk, V] buffer: 2^23 is 32 MiB, 55 rows of a 151,936-row head. On 2 loaded CPU
# cores, 27 to 440 rows (2^22 to 2^26) showed no consistent winner (docs/benchmarks.md, "chunked
# logits"); the smaller buffer keeps the peak low.
CHUNK_ELEMENTS = 2 ** 23


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one [rows, V] fp32 buffer holds about CHUNK_ELEMENTS numbers."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _raw_logits(h, weight, bias, dtype):
    # weight and bias arrive already in `dtype`: cast once per call, not once per chunk
    s = h.to(dtype) @ weight.t()
    if bias is not None:
        s = s + bias
    return s.float()


def _capped(s, temperature, softcap):
    """z and tanh(s / c) (None without a softcap)."""
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    return (s / temperature if temperature != 1.0 else s), t


def _chunk_forward(h, weight, bias, targets, temperature: float, softcap: Optional[float], with_entropy: bool,
                   dtype: torch.dtype):
    """(log p, logsumexp z, H or None) of one chunk of rows."""
    z, _ = _capped(_raw_logits(h, weight, bias, dtype), temperature, softcap)
    lse = torch.logsumexp(z, -1)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    logp = torch.where(valid, z.gather(-1, safe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    if not with_entropy:
        return logp, lse, None
    ent = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, lse, ent


def _chunk_backward(h, weight, bias, targets, lse, g_logp, g_ent, temperature: float, softcap: Optional[float],
                    dtype: torch.dtype):
    """∂/∂s [rows, V] of one chunk (fp32), from the equations in the module docstring; `lse` is the
    forward's logsumexp z, so the recomputed logits need one pass less."""
    z, t = _capped(_raw_logits(h, weight, bias, dtype), temperature, softcap)
    logp_all = z.sub_(lse[:, None])
    p = logp_all.exp()
    valid = targets != IGNORE_INDEX
    g = torch.where(valid, g_logp, torch.zeros_like(g_logp))
    if g_ent is not None:
        ent = -(p * logp_all).sum(-1, keepdim=True)
        dz = logp_all.add_(ent).mul_(p).mul_(-g_ent[:, None])
        dz.addcmul_(p, g[:, None], value=-1)
    else:
        dz = p.mul_(-g[:, None])
    dz.scatter_add_(-1, targets.masked_fill(~valid, 0)[:, None], g[:, None])
    if temperature != 1.0:
        dz /= temperature
    if t is not None:
        dz.mul_(1 - t * t)
    return dz


def _chunk_forward_jacobian(h, weight, bias, targets, temperature: float, softcap: Optional[float],
                            with_entropy: bool, dtype: torch.dtype):
    """`_chunk_forward` plus ∂ log p_i / ∂h_i [rows, d] (fp32): with a frozen head the backward is then
    g_i · that row, and the chunk's logits need not be recomputed."""
    z, t = _capped(_raw_logits(h, weight, bias, dtype), temperature, softcap)
    lse = torch.logsumexp(z, -1)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    logp = torch.where(valid, z.gather(-1, safe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    logp_all = z.sub_(lse[:, None])
    p = logp_all.exp()
    ent = -(p * logp_all).sum(-1) if with_entropy else None
    ds = p.mul_(-valid.float()[:, None])
    ds.scatter_add_(-1, safe[:, None], valid.float()[:, None])
    if temperature != 1.0:
        ds /= temperature
    if t is not None:
        ds.mul_(1 - t * t)
    return logp, lse, ent, (ds.to(dtype) @ weight).float()


class _ChunkedHead(torch.autograd.Function):
    """(log p [N], H [N] or an empty tensor) of the head. The backward recomputes each chunk's logits,
    except with a frozen head (`jacobian`): then ∂log p/∂h [N, d] is taken in the forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, temperature, softcap, with_entropy, dtype, fwd, bwd,
                jacobian):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        jac = torch.empty(h.shape if jacobian else (0,), dtype=torch.float32, device=h.device)
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dtype), (None if bias is None else bias.to(dtype))
            for a in range(0, n, chunk_size):
                rows = slice(a, a + chunk_size)
                if jacobian:
                    logp[rows], lse[rows], e, jac[rows] = _chunk_forward_jacobian(
                        h[rows], w, b, targets[rows], temperature, softcap, with_entropy, dtype)
                else:
                    logp[rows], lse[rows], e = fwd(h[rows], w, b, targets[rows], temperature, softcap,
                                                   with_entropy, dtype)
                if with_entropy:
                    ent[rows] = e
        ctx.save_for_backward(h, weight, bias, targets, lse, jac)
        ctx.conf = (chunk_size, temperature, softcap, with_entropy, dtype, bwd, jacobian)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, targets, lse, jac = ctx.saved_tensors
        chunk_size, temperature, softcap, with_entropy, dtype, bwd, jacobian = ctx.conf
        need = ctx.needs_input_grad[:3]
        none = (None,) * 9
        if g_logp is None and g_ent is None:
            return (None,) * 3 + none
        if not jacobian:
            return _recompute_grads(h, weight, bias, targets, lse, g_logp, g_ent, need, ctx.conf) + none
        # frozen head: dh = g · ∂log p/∂h, kept from the forward; only an entropy gradient is recomputed
        dh = jac * g_logp[:, None] if g_logp is not None else torch.zeros_like(jac)
        if g_ent is not None:
            dh += _recompute_grads(h, weight, bias, targets, lse, None, g_ent, need, ctx.conf)[0].float()
        return (dh.to(h.dtype), None, None) + none


def _recompute_grads(h, weight, bias, targets, lse, g_logp, g_ent, need, conf):
    """(∂h, ∂W, ∂b) chunk by chunk, each chunk's logits recomputed."""
    chunk_size, temperature, softcap, _, dtype, bwd, _ = conf
    need_h, need_w, need_b = need
    n = h.shape[0]
    if g_logp is None:
        g_logp = torch.zeros(n, dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    db = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        w, b = weight.to(dtype), (None if bias is None else bias.to(dtype))
        for a in range(0, n, chunk_size):
            rows = slice(a, a + chunk_size)
            hc = h[rows]
            ds = bwd(hc, w, b, targets[rows], lse[rows], g_logp[rows].float(),
                     None if g_ent is None else g_ent[rows].float(), temperature, softcap, dtype)
            if need_b:
                db += ds.sum(0)
            ds = ds.to(dtype)
            if need_h:
                dh[rows] = ds @ w
            if need_w:
                if dtype == torch.float32:
                    dw.addmm_(ds.t(), hc.float())
                else:
                    dw += (ds.t() @ hc.to(dtype)).float()
    return (dh.to(h.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None)


_COMPILED = {}


def _compiled(name: str):
    # torch.compile is deferred: importing inductor costs seconds and the eager path is the default
    if name not in _COMPILED:
        fn = {"forward": _chunk_forward, "backward": _chunk_backward}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def chunked_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0, softcap: Optional[float] = None,
                  with_entropy: bool = False, chunk_size: Optional[int] = None, compile: bool = False):
    """Per-row log-probs of `targets` under the head (and the per-row entropy), chunk by chunk.

    Args:
        h: [N, d] hidden states at the loss positions (any float dtype; autocast is honoured).
        weight: [V, d] the output head. bias: [V] or None.
        targets: [N] long, IGNORE_INDEX (-100) where no loss falls (log p = 0 there, no gradient).
        temperature: τ > 0; the logits are divided by it (after the softcap).
        softcap: c of Gemma-2's final_logit_softcapping, or None.
        with_entropy: also return H [N] (differentiable).
        chunk_size: rows per chunk; default `default_chunk_size(V)`.
        compile: run each chunk's math through `torch.compile` (see docs/benchmarks.md for which is
            faster where; eager is the default).
    Returns:
        logps [N] fp32, and entropy [N] fp32 or None.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_logps: h must be [N, d] and weight [V, d], got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"chunked_logps: targets must be [N] = [{h.shape[0]}], got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"chunked_logps: temperature must be > 0, got {temperature}")
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunked_logps: chunk_size must be >= 1, got {chunk_size}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype,
                                                                                                    weight.dtype)
    fwd, bwd = (_compiled("forward"), _compiled("backward")) if compile else (_chunk_forward, _chunk_backward)
    # a frozen head (LoRA, prompt tuning, a reference pass with grad) needs only ∂/∂h: take it in the
    # forward, from the logits already there, instead of recomputing every chunk in the backward
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    jacobian = frozen and h.requires_grad and torch.is_grad_enabled() and not compile
    logp, ent = _ChunkedHead.apply(h, weight, bias, targets, int(chunk_size), float(temperature),
                                   None if softcap is None else float(softcap), with_entropy, dtype, fwd, bwd,
                                   jacobian)
    return logp, (ent if with_entropy else None)


def chunked_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **kw) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Summed NLL over the rows whose target is not IGNORE_INDEX, and their count.

    L_sum = − Σ_{i : y_i ≠ −100} log p_i        (log p_i as in `chunked_logps`; same keywords)

    The same numbers as `posttrain.losses.sft.target_nll` on the materialised logits.
    """
    logp, _ = chunked_logps(h, weight, targets, **kw)
    return -logp.sum(), (targets != IGNORE_INDEX).sum()
