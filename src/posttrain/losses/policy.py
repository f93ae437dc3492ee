"""The group policy losses by name: GRPO's clipped token surrogate (`posttrain.losses.grpo`), GSPO's
sequence-level ratio and CISPO's clipped importance weights. Same arguments, `(loss, metrics)` out.
"""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.losses.grpo import _AGGREGATIONS, GRPO_AGGREGATIONS, grpo_loss
from posttrain.losses.rl import _check_mask, _zero_pad, kl_penalty, masked_mean

__all__ = ["gspo_loss", "cispo_loss", "POLICY_LOSSES", "policy_loss"]


def _policy_inputs(fn, logps, old_logps, advantages, mask, ref_logps, beta):
    """Shared argument checks of the sequence/token losses below; returns masked, detached inputs."""
    if old_logps is None:
        old_logps = logps.detach()
    m = _check_mask(fn, mask, logps=logps, old_logps=old_logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"{fn}: beta={beta} needs ref_logps (reference per-token log-probs, [B, T])")
        _check_mask(fn, mask, ref_logps=ref_logps)
    return m, _zero_pad(logps, m), _zero_pad(old_logps.detach(), m), advantages.detach()


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence Policy Optimization").

    The reward is given to the whole sequence, so the importance ratio is taken over the whole
    sequence too: the geometric mean of the token ratios (length-normalised, so that sequences of
    different lengths share one clip range). Clipping then keeps or drops whole sequences:

        s_i = exp( (1/|y_i|) sum_t (log pi(y_i,t) - log pi_old(y_i,t)) )
        L   = mean_i [ -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) ]
              + beta * mean_i token_mean_t k3_t

    The paper's clip ranges (3e-4, 4e-4) are the defaults: a sequence ratio moves far less than a
    token ratio.

    Args:
        logps: [B, T] per-token log-probs under the current policy (with grad).
        old_logps: [B, T] under the sampling policy, or None (one on-policy update: s_i = 1 in value).
        advantages: [B] one per sequence (e.g. from ``group_advantages``).
        mask: [B, T]; every row needs at least one real token.
        ref_logps, beta: optional k3 KL to the reference, as in ``grpo_loss``.
        eps_low, eps_high: clip range of s_i.
    Returns:
        loss: scalar. metrics: ``clip_frac`` (fraction of sequences whose clipped term is active),
        ``seq_ratio`` (mean s_i) and, with beta > 0, ``kl``; floats.
    """
    m, logps, old_logps, advantages = _policy_inputs("gspo_loss", logps, old_logps, advantages, mask, ref_logps, beta)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"gspo_loss: advantages must have shape [B]={tuple(mask.shape[:1])} (one per sequence), "
                         f"got {tuple(advantages.shape)}")
    if not m.any(dim=1).all():
        raise ValueError("gspo_loss: every row needs at least one real token (a sequence ratio of no tokens)")
    seq_ratio = torch.exp(masked_mean(logps - old_logps, m, dim=1))
    unclipped = seq_ratio * advantages
    clipped = torch.clamp(seq_ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    metrics = {"clip_frac": float((clipped < unclipped).to(logps.dtype).mean()), "seq_ratio": float(seq_ratio.detach().mean())}
    if beta != 0.0:
        kl = masked_mean(kl_penalty(logps, _zero_pad(ref_logps.detach(), m), estimator="k3"), m, dim=1).mean()
        loss = loss + beta * kl
        metrics["kl"] = float(kl)
    return loss, metrics


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 1.0,
    eps_high: float = 4.0,
    aggregation: str = "dapo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped IS-weight Policy Optimization (MiniMax 2025, "MiniMax-M1", CISPO).

    PPO/GRPO clipping zeroes the gradient of every token whose ratio leaves the trust region, and
    the rare, high-ratio tokens it drops are often the reflective ones ("However", "Recheck").
    CISPO clips the importance-sampling *weight* instead, under a stop-gradient, and keeps every
    token's REINFORCE gradient:

        w_t = sg( clip(rho_t, 1 - eps_low, 1 + eps_high) ),   rho_t = pi / pi_old
        l_t = -w_t A log pi(y_t) + beta * k3_t

    aggregated over tokens like ``grpo_loss`` (default ``dapo``: sum over tokens / number of
    tokens, as in the paper). The defaults leave the lower side unclipped (eps_low = 1, as the
    paper does) and cap the weight at 1 + eps_high = 5 (TRL's default cap for cispo).

    Args:
        logps, old_logps, advantages ([B] or [B, T]), mask, ref_logps, beta: as in ``grpo_loss``.
        eps_low, eps_high: the weight's clip range.
        aggregation, max_completion_length: as in ``grpo_loss``.
    Returns:
        loss: scalar (its value is -mean(w A log pi), its gradient -w A grad log pi).
        metrics: ``clip_frac`` (fraction of tokens whose weight was clipped), ``is_weight`` (mean w)
        and, with beta > 0, ``kl``; floats.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"cispo_loss: unknown aggregation {aggregation!r}; valid: {', '.join(GRPO_AGGREGATIONS)}")
    m, logps, old_logps, advantages = _policy_inputs("cispo_loss", logps, old_logps, advantages, mask, ref_logps, beta)
    if advantages.shape == mask.shape[:1]:
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != mask.shape:
        raise ValueError(f"cispo_loss: advantages must have shape [B]={tuple(mask.shape[:1])} or "
                         f"[B, T]={tuple(mask.shape)}, got {tuple(advantages.shape)}")
    ratio = torch.exp(logps.detach() - old_logps)
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -weight * advantages * logps
    metrics = {"clip_frac": float(masked_mean((weight != ratio).to(logps.dtype), m)),
               "is_weight": float(masked_mean(weight, m))}
    if beta != 0.0:
        kl = kl_penalty(logps, _zero_pad(ref_logps.detach(), m), estimator="k3")
        per_token = per_token + beta * kl
        metrics["kl"] = float(masked_mean(kl, m))
    max_len = mask.shape[1] if max_completion_length is None else max_completion_length
    if aggregation == "dr_grpo" and max_len < mask.shape[1]:
        raise ValueError(
            f"cispo_loss: max_completion_length={max_len} is shorter than the completions' length {mask.shape[1]}"
        )
    return _AGGREGATIONS[aggregation](per_token, m, max_len), metrics


_POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "grpo": grpo_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}
POLICY_LOSSES = tuple(_POLICY_LOSSES)


def policy_loss(name: str, logps, old_logps, advantages, mask, **kw) -> tuple[torch.Tensor, dict]:
    """The group policy loss ``name`` (one of ``POLICY_LOSSES``: grpo's clipped token surrogate, gspo,
    cispo) on the same arguments; keyword arguments go to that function. Returns (loss, metrics)."""
    if name not in _POLICY_LOSSES:
        raise ValueError(f"policy_loss: unknown loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")
    return _POLICY_LOSSES[name](logps, old_logps, advantages, mask, **kw)
