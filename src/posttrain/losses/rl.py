"""RL building blocks and PPO: masked statistics, KL estimators, GAE, PPO's losses and advantages.

The group-relative methods (GRPO and its descendants) are in `posttrain.losses.grpo`.

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
    "ppo_advantages",
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
