"""Preference-optimization losses over per-sequence log-probabilities: KTO, ORPO, SimPO, the reward
model (DPO and its variants are in `posttrain.losses.dpo`).

Every function here is pure: tensors in, tensors out, no model and no config. Inputs are
per-sequence quantities of shape [B] (the same shape for every argument of one call).
"Summed" log-probs are ``sum_t log p(y_t | x, y_<t)`` over completion tokens only; "mean"
log-probs divide that sum by the completion's token count (see ``losses.sft.sequence_logps``).

Returned per-example losses are not reduced: the stage sums them and the engine divides by the
number of pairs of the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "kto_loss",
    "kto_kl_estimate",
    "mismatched_indices",
    "orpo_loss",
    "log1mexp",
    "simpo_loss",
    "reward_model_loss",
]


def _check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}={s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: all inputs must have the same shape, got {listed}")


def _smoothed_sigmoid_loss(logits: torch.Tensor, eps: float) -> torch.Tensor:
    # conservative / label-smoothed binary cross-entropy (Mitchell 2023, "cDPO"): the preference
    # label is assumed flipped with probability eps.
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# --------------------------------------------------------------------------------------- KTO


def mismatched_indices(batch_size: int) -> torch.Tensor:
    """Completion index to pair with each prompt for KTO's KL estimate: i -> (i + 1) mod B.

    Shifting by one gives every prompt a completion written for a different prompt, as in
    the KTO paper (Ethayarajh et al. 2024, section 4.1). Build the mismatched batch as
    ``prompts[i] + completions[idx[i]]`` and score it under policy and reference.

    Returns: [B] long tensor.
    """
    if batch_size < 2:
        raise ValueError(
            f"mismatched_indices: KTO's KL estimate pairs each prompt with another example's "
            f"completion, so it needs batch_size >= 2, got {batch_size}"
        )
    return torch.roll(torch.arange(batch_size), shifts=-1)


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: a detached, batch-level estimate of KL(pi || pi_ref).

        z = max(0, mean_i [logpi(y'_i|x_i) - logpi_ref(y'_i|x_i)])

    where y'_i is a completion of another prompt (``mismatched_indices``). The paper does not
    back-propagate through z (it only sets the reference point of the value function) and
    clamps it at 0 because a KL is non-negative while the estimate need not be.

    Args:
        policy_mismatched_logps: [B] summed log-probs of the mismatched pairs under the policy.
        ref_mismatched_logps: [B] same under the reference.
    Returns:
        z: scalar tensor, detached, >= 0.
    """
    _check_same_shape("kto_kl_estimate", policy_mismatched_logps=policy_mismatched_logps,
                      ref_mismatched_logps=ref_mismatched_logps)
    return (policy_mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization").

    KTO learns from unpaired thumbs-up / thumbs-down examples. Following prospect theory, each
    completion's implicit reward r = logpi(y|x) - logpi_ref(y|x) is judged against a reference
    point z (the policy's KL from the reference, see ``kto_kl_estimate``) through a saturating
    value function, so gains and losses are weighed separately (lambda_D, lambda_U):

        desirable:   L = lambda_D * (1 - sigma(beta (r - z)))
        undesirable: L = lambda_U * (1 - sigma(beta (z - r)))

    z is detached and clamped at >= 0 here too, whatever is passed in.

    Args:
        policy_logps: [B] summed completion log-probs under the policy.
        ref_logps: [B] same under the reference.
        labels: [B] bool (or 0/1), True for desirable examples.
        kl: scalar tensor or float, the KL estimate z.
        beta: inverse temperature of the implicit reward.
        desirable_weight: lambda_D. The paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3].
        undesirable_weight: lambda_U.
    Returns:
        losses: [B] per-example losses.
        rewards: [B] beta * (logpi - logpi_ref), detached.
    """
    _check_same_shape("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if labels.dtype != torch.bool:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("kto_loss: labels must be bool or 0/1 (True = desirable)")
        labels = labels.bool()
    z = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0.0)
    if z.numel() != 1:
        raise ValueError(f"kto_loss: kl must be a scalar (one estimate per batch), got shape {tuple(z.shape)}")
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - r)))
    return torch.where(labels, desirable, undesirable), (beta * r).detach()


# -------------------------------------------------------------------------------------- ORPO


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and for very negative x.

    Mächler 2012, "Accurately Computing log(1 - exp(-|a|))": use log(-expm1(x)) for x > -log 2
    (where 1 - e^x cancels) and log1p(-e^x) below (where e^x underflows gracefully).
    """
    # torch.where evaluates both branches; feed each only the inputs it is accurate for, so
    # neither produces inf/nan whose gradient would leak through the unused side.
    near_zero = x > -0.6931471805599453
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model").

    ORPO adds a small odds-ratio penalty to the SFT loss, so one stage both learns the chosen
    answers and disfavours the rejected ones, with no reference model. With l the mean token
    log-prob and odds(y) = p / (1 - p), p = e^l:

        log_odds = (l_c - l_r) - (log(1 - e^{l_c}) - log(1 - e^{l_r}))
        L = NLL_chosen - lam * log sigma(log_odds)

    log(1 - e^l) is computed with ``log1mexp``. Mean log-probs are clamped to <= -1e-12 so an
    exactly-zero mean (a fully confident model) stays finite.

    Args:
        chosen_mean_logps: [B] mean completion-token log-probs of the chosen completions.
        rejected_mean_logps: [B] same for the rejected completions.
        chosen_nll: [B] SFT loss on the chosen completions (the paper uses the token mean).
        lam: weight of the odds-ratio term (the paper's lambda; 0.1 in its experiments).
    Returns:
        losses: [B] per-pair losses.
        log_odds: [B] the log odds ratio, detached (for logging).
    """
    _check_same_shape("orpo_loss", chosen_mean_logps=chosen_mean_logps,
                      rejected_mean_logps=rejected_mean_logps, chosen_nll=chosen_nll)
    lc = chosen_mean_logps.clamp(max=-1e-12)
    lr = rejected_mean_logps.clamp(max=-1e-12)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


# ------------------------------------------------------------------------------------- SimPO


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization
    with a Reference-Free Reward").

    SimPO's implicit reward is the length-normalised log-likelihood the model uses to generate,
    beta * l (l = mean token log-prob), so no reference model is needed; a target margin gamma
    asks the chosen reward to beat the rejected one by at least gamma:

        L = -(1 - eps) log sigma(beta (l_c - l_r) - gamma) - eps log sigma(-(beta (l_c - l_r) - gamma))

    (eps = label_smoothing, the cDPO form; eps = 0 is the paper's loss.)

    Args:
        chosen_mean_logps: [B] mean completion-token log-probs of the chosen completions.
        rejected_mean_logps: [B] same for the rejected completions.
        beta: reward scale (the paper uses 2.0-2.5).
        gamma: target reward margin (absolute, not gamma/beta).
        label_smoothing: eps in [0, 0.5].
    Returns:
        losses: [B]; chosen_rewards: [B] beta * l_c, detached; rejected_rewards: [B] beta * l_r, detached.
    """
    _check_same_shape("simpo_loss", chosen_mean_logps=chosen_mean_logps, rejected_mean_logps=rejected_mean_logps)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"simpo_loss: label_smoothing needs 0 <= eps <= 0.5, got {label_smoothing}")
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    return losses, (beta * chosen_mean_logps).detach(), (beta * rejected_mean_logps).detach()


# ------------------------------------------------------------------------------ reward model


def reward_model_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry pairwise loss for a scalar reward model (Ouyang et al. 2022, InstructGPT).

    P(y_c > y_r) = sigma(s_c - s_r); with an optional margin m (Llama 2 uses the annotators'
    preference strength) the model must separate the pair by at least m:

        L = -log sigma(s_c - s_r - m)

    Args:
        chosen_scores: [B] reward-model scores of the chosen completions.
        rejected_scores: [B] scores of the rejected completions.
        margin: None (m = 0), a float, or a [B] tensor.
    Returns:
        losses: [B].
    """
    _check_same_shape("reward_model_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.numel() != 1:
            _check_same_shape("reward_model_loss", chosen_scores=chosen_scores, margin=margin)
        diff = diff - margin
    return -F.logsigmoid(diff)
