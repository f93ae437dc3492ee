"""Policy-gradient losses and advantage estimators for PPO and GRPO.

Pure functions over per-token tensors of shape [B, T] (T = completion positions) with a
``mask`` of the same shape that is True (or 1) on real completion tokens and False on padding.
Log-probs are per-token log pi(a_t | s_t) of the sampled tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "whiten",
    "entropy_from_logits",
    "KL_ESTIMATORS",
    "kl_penalty",
    "token_rewards",
    "gae",
    "explained_variance",
    "ppo_policy_loss",
    "ppo_value_loss",
    "GRPO_ADVANTAGE_SCALES",
    "grpo_advantages",
    "zero_variance_groups",
    "GRPO_AGGREGATIONS",
    "grpo_loss",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "ADVANTAGE_ESTIMATORS",
    "group_advantages",
    "gspo_loss",
    "cispo_loss",
    "POLICY_LOSSES",
    "policy_loss",
]


def _check_mask(fn: str, mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but mask has shape {tuple(mask.shape)}")
    return mask.bool()


def _zero_pad(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # Selecting out padding *before* exp/square matters: a -inf log-prob at a padded position
    # would otherwise give nan * 0 = nan in the backward pass and poison the logits' gradient.
    return torch.where(m, x, torch.zeros_like(x))


# ---------------------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set (all of them, or along ``dim``).

    Padding may hold anything (even inf/nan): it is selected out, not multiplied by 0. An empty
    selection gives 0 rather than nan.
    """
    m = mask.bool()
    total = torch.where(m, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected by default)."""
    m = mask.bool()
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    n = m.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` to unit variance over the masked positions (PPO's advantage whitening).

        w = (x - mean) / sqrt(var + 1e-8)          (shift_mean=True)
        w = (x - mean) / sqrt(var + 1e-8) + mean   (shift_mean=False: keeps the mean, e.g. rewards)

    Statistics use only masked positions; padding positions are returned as 0.

    Args: values [B, T]; mask [B, T]. Returns: [B, T].
    """
    m = _check_mask("whiten", mask, values=values)
    mean = masked_mean(values, m)
    var = masked_var(values, m)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position.

        H = logsumexp(z) - sum_v softmax(z)_v z_v

    Args: logits [B, T, V]. Returns: [B, T] (float32 at least).
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


# ------------------------------------------------------------------------------------------ KL


def _k1(logr: torch.Tensor) -> torch.Tensor:
    return logr


def _k2(logr: torch.Tensor) -> torch.Tensor:
    return 0.5 * logr**2


def _k3(logr: torch.Tensor) -> torch.Tensor:
    # exp(-logr) - (-logr) - 1 >= 0 since e^u >= 1 + u
    return torch.expm1(-logr) + logr


_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}
KL_ESTIMATORS = tuple(_KL_ESTIMATORS)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL Divergence").

    With u = logpi - logpi_ref at each sampled token:

        k1 = u                       unbiased, high variance, can be negative
        k2 = u^2 / 2                 biased, low variance, >= 0
        k3 = e^{-u} - (-u) - 1       unbiased, low variance, >= 0 (GRPO's choice)

    Args: logps [B, T]; ref_logps [B, T]. Returns: [B, T] (not masked; apply your mask).
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"kl_penalty: logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ")
    return _KL_ESTIMATORS[estimator](logps - ref_logps)


# ----------------------------------------------------------------------------------------- PPO


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """RLHF per-token reward (Ziegler et al. 2019; Ouyang et al. 2022).

        r_t = -kl_coef * KL_t  + [t = last real token] * score

    Args: scores [B] (reward model / reward functions); kl [B, T] per-token KL; mask [B, T].
    Returns: [B, T], 0 on padding.
    """
    m = _check_mask("token_rewards", mask, kl=kl)
    if scores.shape != mask.shape[:1]:
        raise ValueError(
            f"token_rewards: scores must have shape [B]={tuple(mask.shape[:1])}, got {tuple(scores.shape)}"
        )
    if not m.any(dim=1).all():
        raise ValueError("token_rewards: every row needs at least one real token to receive its score")
    rewards = torch.where(m, -kl_coef * kl, torch.zeros_like(kl))
    # last set position per row, whether padding is on the left or the right
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, last] = rewards[rows, last] + scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016).

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = sum_k (gamma lam)^k delta_{t+k} = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t     (the value target)

    The episode ends at each row's last real token: V and A after it are 0 (no bootstrap).
    Each row's real tokens must be contiguous (left or right padding). Padding positions of
    the outputs are 0. Computed without gradient (advantages are targets).

    Args: rewards [B, T]; values [B, T]; mask [B, T]. Returns: (advantages [B, T], returns [B, T]).
    """
    m = _check_mask("gae", mask, rewards=rewards, values=values)
    with torch.no_grad():
        r = torch.where(m, rewards, torch.zeros_like(rewards))
        v = torch.where(m, values, torch.zeros_like(values))
        adv = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        next_adv = torch.zeros_like(r[:, 0])
        for t in range(r.shape[1] - 1, -1, -1):
            delta = r[:, t] + gamma * next_value - v[:, t]
            a_t = torch.where(m[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
            adv[:, t] = a_t
            # a padded position cuts the recursion, so nothing leaks across the episode's end
            next_value, next_adv = v[:, t], a_t
        returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is a perfect critic, <= 0 is useless."""
    m = _check_mask("explained_variance", mask, values=values, returns=returns)
    var_r = masked_var(returns, m)
    return 1.0 - masked_var(returns - values, m) / var_r.clamp(min=1e-8)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization").

    The ratio rho = pi/pi_old is clipped so one batch of samples cannot move the policy far
    from the one that generated it; the min makes the objective a pessimistic bound:

        L = masked_mean( max(-A rho, -A clip(rho, 1 - c, 1 + c)) )

    Args:
        logps: [B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logps: [B, T] the same under the sampling policy (no grad needed).
        advantages: [B, T].
        mask: [B, T].
        clip: c.
    Returns:
        (loss: scalar, metrics: {"clip_frac": the fraction of tokens where the clipped term was the
        active (larger) one, a float}).
    """
    m = _check_mask("ppo_policy_loss", mask, logps=logps, old_logps=old_logps, advantages=advantages)
    logps, old_logps, advantages = _zero_pad(logps, m), _zero_pad(old_logps.detach(), m), _zero_pad(advantages, m)
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), m).detach()
    return loss, {"clip_frac": float(clipfrac)}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
) -> torch.Tensor:
    """PPO's clipped value loss: the critic moves at most ``clip`` from its rollout-time values.

        V_clip = V_old + clip(V - V_old, -c, c)
        L = masked_mean( max((V - R)^2, (V_clip - R)^2) ) / 2

    Args: values [B, T] (with grad); old_values [B, T]; returns [B, T] (targets from ``gae``);
        mask [B, T]. Returns: scalar loss.
    """
    m = _check_mask("ppo_value_loss", mask, values=values, old_values=old_values, returns=returns)
    values, returns, old = _zero_pad(values, m), _zero_pad(returns, m), _zero_pad(old_values.detach(), m)
    clipped = old + torch.clamp(values - old, -clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, m)


# ---------------------------------------------------------------------------------------- GRPO


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
    metrics = {"clip_frac": float((clipped < unclipped).to(logps.dtype).mean()), "seq_ratio": float(seq_ratio.mean())}
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


def _grpo_clipped(logps, old_logps, advantages, mask, **kw) -> tuple[torch.Tensor, dict]:
    out = grpo_loss(logps, old_logps, advantages, mask, **kw)
    # grpo_loss is moving to the (loss, metrics) convention (issue #15); once it has, register it directly
    return out if isinstance(out, tuple) else (out, {})


_POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "grpo": _grpo_clipped,
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


def ppo_advantages(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0,
                   lam: float = 0.95, whiten_advantages: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-RLHF's advantages (Ziegler et al. 2019; Ouyang et al. 2022): the per-token KL to the
    reference is a penalty on every token and the sequence's score lands on its last token
    (``token_rewards``); GAE(gamma, lambda) against the values gives advantages and returns.

        kl_t = estimator(log pi_t - log pi_ref_t);   r_t = -kl_coef kl_t + [t = last] score
        (A, R) = gae(r, V);   A <- whiten(A) when asked

    Args: scores [B]; logps, ref_logps, values, mask [B, T]. Returns (advantages, returns, kl), each [B, T]
    and zero outside the mask.
    """
    m = _check_mask("ppo_advantages", mask, logps=logps, ref_logps=ref_logps, values=values)
    kl = _zero_pad(kl_penalty(logps, ref_logps, estimator=kl_estimator), m)
    adv, returns = gae(token_rewards(scores, kl, m, kl_coef=kl_coef), values, m, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv = whiten(adv, m)
    return adv, returns, kl
