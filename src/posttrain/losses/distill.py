"""Distillation losses: per-token divergences between a student's and a teacher's next-token
distributions over the same vocabulary.

Pure functions over logits (or log-probs: ``log_softmax`` leaves log-probs unchanged) of shape
[B, T, V] with a ``mask`` [B, T] that is True on the positions that carry a loss. With S the
student's distribution and P the teacher's at one position:

    reverse_kl:  KL(S || P) = sum_v S_v (log S_v - log P_v)       mode-seeking: the student puts its mass
                                                                   where the teacher has mass (the default;
                                                                   Gu et al. 2024, "MiniLLM")
    forward_kl:  KL(P || S) = sum_v P_v (log P_v - log S_v)       mean-seeking: the student covers all of
                                                                   the teacher's mass (Hinton et al. 2015)
    jsd:         JSD_beta = beta KL(P || M) + (1 - beta) KL(S || M),  M = beta P + (1 - beta) S
                                                                   (Agarwal et al. 2024, "On-Policy
                                                                   Distillation of Language Models", GKD)

On the student's own samples (on-policy distillation / GKD) the teacher scores the tokens the
student wrote, so the student learns where it actually goes wrong.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["DIVERGENCES", "token_divergence", "distill_loss"]


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs; a token with p_v = 0 adds 0.
    Selected out rather than multiplied by 0: 0 * (-inf) would be nan and poison the gradient."""
    zero = torch.isneginf(lp)
    lp, lq = torch.where(zero, torch.zeros_like(lp), lp), torch.where(zero, torch.zeros_like(lq), lq)
    return torch.where(zero, torch.zeros_like(lp), lp.exp() * (lp - lq)).sum(-1)


def _reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(s, t)


def _forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(t, s)


def _jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    # log M = logsumexp(log beta + t, log(1 - beta) + s): stable where either distribution underflows
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


_DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "jsd": _jsd,
}
DIVERGENCES = tuple(_DIVERGENCES)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str = "reverse_kl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence between the two next-token distributions (see the module docstring).

    Args:
        student_logits: [..., V] logits or log-probs (with grad).
        teacher_logits: [..., V] the same for the teacher (detached here: the teacher is not trained).
        divergence: one of ``DIVERGENCES``.
        beta: the JSD's interpolation weight, in (0, 1); 0.5 is the symmetric Jensen-Shannon divergence.
        temperature: both distributions are softmax(z / temperature).
    Returns:
        [...] float32 (at least), >= 0.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"token_divergence: unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"token_divergence: the student's vocabulary has {student_logits.shape[-1]} entries and "
                         f"the teacher's {teacher_logits.shape[-1]}; distillation needs one shared tokenizer")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token_divergence: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"token_divergence: jsd needs 0 < beta < 1 (beta=0 or 1 makes M one of the two "
                         f"distributions; use forward_kl or reverse_kl), got {beta}")
    if temperature <= 0:
        raise ValueError(f"token_divergence: temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    return _DIVERGENCES[divergence](s, t, beta)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                 divergence: str = "reverse_kl", beta: float = 0.5,
                 temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Summed per-token divergence over the masked positions, and its metrics.

        L = sum_{b,t: mask} D(S_{b,t}, P_{b,t})

    A sum, not a mean: the caller divides by the tokens of the whole step (the engine's rule).

    Args:
        student_logits, teacher_logits: [B, T, V]; mask: [B, T].
        divergence, beta, temperature: as in ``token_divergence``.
    Returns:
        loss: scalar sum. metrics: ``divergence`` (mean per masked token, a float) and ``tokens`` (an int).
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"distill_loss: mask has shape {tuple(mask.shape)} but the logits have "
                         f"{tuple(student_logits.shape[:-1])} positions")
    d = token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature)
    m = mask.bool()
    total = torch.where(m, d, torch.zeros_like(d)).sum()
    n = m.sum()
    return total, {"divergence": float(total.detach() / n.clamp(min=1)), "tokens": int(n)}
