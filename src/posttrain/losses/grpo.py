"""Group-relative policy optimization: GRPO (Shao et al. 2024) and its descendants.

Advantages from groups of completions of one prompt (GRPO, Dr. GRPO, RLOO, REINFORCE++) and GRPO's
clipped token surrogate with its aggregations; GSPO and CISPO are in `posttrain.losses.policy`.
Pure functions over per-token tensors [B, T] with a ``mask`` that is True on real completion
tokens; the loss returns ``(loss, metrics)``, metrics being floats.
"""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.losses.rl import _check_mask, _zero_pad, kl_penalty, masked_mean

__all__ = [
    "GRPO_ADVANTAGE_SCALES",
    "grpo_advantages",
    "zero_variance_groups",
    "GRPO_AGGREGATIONS",
    "grpo_loss",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "ADVANTAGE_ESTIMATORS",
    "group_advantages",
]

def _group_view(rewards: torch.Tensor, group_size: int, fn: str) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"{fn}: group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"{fn}: batch size {rewards.numel()} is not a multiple of group_size {group_size}; "
            "rewards must hold consecutive groups of group_size completions of the same prompt"
        )
    return rewards.view(-1, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B / group_size] bool: groups whose completions all got the same reward (no signal)."""
    g = _group_view(rewards, group_size, "zero_variance_groups")
    return g.amax(1) == g.amin(1)


def _scale_group(centered: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    return centered / (grouped.std(dim=1, keepdim=True) + 1e-4)


def _scale_none(centered: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    return centered


_ADVANTAGE_SCALES = {"group": _scale_group, "none": _scale_none}
GRPO_ADVANTAGE_SCALES = tuple(_ADVANTAGE_SCALES)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, "DeepSeekMath", GRPO).

    Each prompt's G sampled completions are their own baseline, replacing PPO's critic:

        A_i = (r_i - mean_g r) / (std_g r + 1e-4)   scale="group" (std with Bessel's correction)
        A_i =  r_i - mean_g r                       scale="none"  (Dr. GRPO, Liu et al. 2025:
                                                     the std division favours too-easy/too-hard prompts)

    Groups whose rewards are all equal get exactly 0 (no rounding residue from the mean).

    Args:
        rewards: [B] scalar rewards, B = num_prompts * group_size, each prompt's completions
            consecutive.
        group_size: G.
        scale: one of ``GRPO_ADVANTAGE_SCALES``.
    Returns:
        advantages: [B], detached.
    """
    if scale not in _ADVANTAGE_SCALES:
        raise ValueError(f"grpo_advantages: unknown scale {scale!r}; valid: {', '.join(GRPO_ADVANTAGE_SCALES)}")
    g = _group_view(rewards.detach(), group_size, "grpo_advantages")
    if not g.is_floating_point():
        g = g.float()
    adv = _ADVANTAGE_SCALES[scale](g - g.mean(dim=1, keepdim=True), g)
    flat = (g.amax(1, keepdim=True) == g.amin(1, keepdim=True))
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def _agg_grpo(per_token: torch.Tensor, m: torch.Tensor, max_len: int) -> torch.Tensor:
    return masked_mean(per_token, m, dim=1).mean()


def _agg_dr_grpo(per_token: torch.Tensor, m: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.where(m, per_token, torch.zeros_like(per_token)).sum() / (m.shape[0] * max_len)


def _agg_dapo(per_token: torch.Tensor, m: torch.Tensor, max_len: int) -> torch.Tensor:
    return masked_mean(per_token, m)


_AGGREGATIONS = {"grpo": _agg_grpo, "dr_grpo": _agg_dr_grpo, "dapo": _agg_dapo}
GRPO_AGGREGATIONS = tuple(_AGGREGATIONS)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """GRPO's clipped surrogate with an optional k3 KL to the reference.

    Per token, with rho = pi/pi_old and the sequence's advantage A:

        l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3_t

    Asymmetric clipping (eps_high > eps_low, "clip-higher") is DAPO's (Yu et al. 2025) remedy
    for entropy collapse. ``aggregation`` decides how tokens are weighted:

        grpo:    mean over sequences of each sequence's token mean (Shao et al. 2024);
                 long sequences' tokens count less.
        dr_grpo: sum over tokens / (B * max_completion_length) (Liu et al. 2025, "Dr. GRPO"):
                 a constant denominator, so no length bias; max_completion_length defaults to T.
        dapo:    sum over tokens / number of tokens (Yu et al. 2025): every token counts equally.

    Args:
        logps: [B, T] per-token log-probs under the current policy (with grad).
        old_logps: [B, T] under the sampling policy, or None for a single on-policy update
            (then rho = 1 in value and the gradient is the plain policy gradient).
        advantages: [B] per sequence (from ``grpo_advantages``) or [B, T] per token.
        mask: [B, T].
        ref_logps: [B, T] under the reference; required when beta > 0.
        beta: KL coefficient.
        eps_low, eps_high: lower and upper clip ranges.
        aggregation: one of ``GRPO_AGGREGATIONS``.
        max_completion_length: the denominator's length for dr_grpo (ignored otherwise).
    Returns:
        (loss: scalar, metrics: {"clip_frac": share of tokens whose ratio is clipped on the side
        that binds (rho < 1 - eps_low with A < 0, rho > 1 + eps_high with A > 0); "kl": the mean
        k3 KL to the reference, when beta > 0}), metrics as floats over the mask.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"grpo_loss: unknown aggregation {aggregation!r}; valid: {', '.join(GRPO_AGGREGATIONS)}")
    if old_logps is None:
        old_logps = logps.detach()
    m = _check_mask("grpo_loss", mask, logps=logps, old_logps=old_logps)
    if advantages.shape == mask.shape[:1]:
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != mask.shape:
        raise ValueError(
            f"grpo_loss: advantages must have shape [B]={tuple(mask.shape[:1])} or [B, T]={tuple(mask.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()
    logps, old_logps = _zero_pad(logps, m), _zero_pad(old_logps.detach(), m)
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    with torch.no_grad():
        adv = advantages.expand_as(ratio)
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        metrics = {"clip_frac": float(masked_mean(clipped.float(), m))}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"grpo_loss: beta={beta} needs ref_logps (reference per-token log-probs, [B, T])")
        _check_mask("grpo_loss", mask, ref_logps=ref_logps)
        kl = kl_penalty(logps, _zero_pad(ref_logps.detach(), m), estimator="k3")
        per_token = per_token + beta * kl
        metrics["kl"] = float(masked_mean(kl.detach(), m))
    max_len = mask.shape[1] if max_completion_length is None else max_completion_length
    if aggregation == "dr_grpo" and max_len < mask.shape[1]:
        raise ValueError(
            f"grpo_loss: max_completion_length={max_len} is shorter than the completions' length {mask.shape[1]}"
        )
    return _AGGREGATIONS[aggregation](per_token, m, max_len), metrics


# ------------------------------------------------------------------ newer estimators (issue #21)
#
# These return ``(loss, metrics)``: a scalar loss and a dict of floats.


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics", RLOO).

    Each completion's baseline is the mean reward of the *other* G - 1 completions of its prompt,
    so the baseline does not depend on the sample it judges and the estimator stays unbiased:

        A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g r)

    No division by a standard deviation. Groups whose rewards are all equal get exactly 0.

    Args: rewards [B], B = num_prompts * G, each prompt's completions consecutive; group_size G.
    Returns: advantages [B], detached.
    """
    g = _group_view(rewards.detach(), group_size, "rloo_advantages")
    if not g.is_floating_point():
        g = g.float()
    adv = (g * group_size - g.sum(dim=1, keepdim=True)) / (group_size - 1)
    flat = g.amax(1, keepdim=True) == g.amin(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models"): normalised over the whole *batch*, not per prompt.

        group_size=None:  A_i = (r_i - mean_B r) / (std_B r + 1e-8)
        group_size=G:     A_i = (r_i - mean_g r) / (std_B (r - mean_g r) + 1e-8)   ("REINFORCE++-baseline")

    A per-prompt std (GRPO's) over-weights prompts that are almost always solved or failed; the
    global std keeps every prompt's advantages on one scale. Std with Bessel's correction; a batch
    whose (centred) rewards are all equal gets exactly 0.

    Args: rewards [B]; group_size G (prompts' completions consecutive) or None.
    Returns: advantages [B], detached.
    """
    r = rewards.detach()
    if r.dim() != 1:
        raise ValueError(f"reinforce_pp_advantages: rewards must have shape [B], got {tuple(r.shape)}")
    if not r.is_floating_point():
        r = r.float()
    if group_size is not None:
        g = _group_view(r, group_size, "reinforce_pp_advantages")
        centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
        # an all-equal group is exactly 0, not its mean's rounding residue
        centred = torch.where((g.amax(1, keepdim=True) == g.amin(1, keepdim=True)).expand_as(g).reshape(-1),
                              torch.zeros_like(centred), centred)
    else:
        centred = r - r.mean()
    if r.numel() < 2 or bool((centred == centred[0]).all()):
        return torch.zeros_like(centred)
    return centred / (centred.std() + 1e-8)


def _adv_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    return grpo_advantages(rewards, group_size, scale="group")


def _adv_dr_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    return grpo_advantages(rewards, group_size, scale="none")


def _adv_reinforce_pp(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    return reinforce_pp_advantages(rewards, group_size)


_ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "grpo": _adv_grpo,
    "dr_grpo": _adv_dr_grpo,
    "rloo": rloo_advantages,
    "reinforce_pp": _adv_reinforce_pp,
}
ADVANTAGE_ESTIMATORS = tuple(_ADVANTAGE_ESTIMATORS)


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo") -> torch.Tensor:
    """Per-sequence advantages [B] from grouped rewards [B] by name (one of ``ADVANTAGE_ESTIMATORS``):

        grpo:          (r - mean_g) / (std_g + 1e-4)        Shao et al. 2024
        dr_grpo:        r - mean_g                           Liu et al. 2025
        rloo:           G/(G-1) (r - mean_g)                 Ahmadian et al. 2024
        reinforce_pp:  (r - mean_g) / std_B(r - mean_g)      Hu 2025 (REINFORCE++-baseline)
    """
    if estimator not in _ADVANTAGE_ESTIMATORS:
        raise ValueError(f"group_advantages: unknown estimator {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return _ADVANTAGE_ESTIMATORS[estimator](rewards, group_size)
