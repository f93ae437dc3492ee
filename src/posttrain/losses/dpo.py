"""DPO and its variants (sigmoid, IPO, hinge, robust), and RPO's chosen NLL, over per-sequence
summed log-probs [B] of the policy and the reference. Pure functions; per-pair losses, unreduced.

To add a variant: a function `(delta, beta, eps) -> per-pair loss` and one entry in `_DPO_LOSSES`;
`dpo.loss` in the config takes its choices from there (docs/architecture.md, worked example).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from posttrain.losses.preference import _check_same_shape, _smoothed_sigmoid_loss

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "chosen_nll"]


def _dpo_sigmoid(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return _smoothed_sigmoid_loss(beta * delta, eps)


def _dpo_robust(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Chowdhury et al. 2024: unbiased under label-flip rate eps (the eps term has a + sign,
    # unlike cDPO), hence the 1/(1-2eps) normalisation.
    logits = beta * delta
    return ((1.0 - eps) * -F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)


def _dpo_hinge(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1.0 - beta * delta)


def _dpo_ipo(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # here delta is already length-normalised (see dpo_loss)
    return (delta - 1.0 / (2.0 * beta)) ** 2


_DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
    "robust": _dpo_robust,
}
DPO_LOSS_TYPES = tuple(_DPO_LOSSES)
# which loss types take label_smoothing, and the open upper bound of eps for each
_SMOOTHING_MAX = {"sigmoid": 0.5, "robust": 0.5}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and its variants.

    DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
    a Reward Model") shows that the RLHF objective's optimal policy defines an implicit reward
    r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), so the Bradley-Terry likelihood of the human
    preferences can be maximised directly over the policy, with no reward model and no sampling.

    With the log-ratio margin

        Delta = (logpi(y_c) - logpi_ref(y_c)) - (logpi(y_r) - logpi_ref(y_r))

    the ``loss_type`` selects:

    - ``"sigmoid"`` (DPO; label smoothing eps is the conservative "cDPO" form):
      L = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences"): a squared loss that regresses the margin to 1/(2 beta) instead of
      pushing it to infinity, so it does not overfit deterministic preferences.
      L = (Delta_bar - 1/(2 beta))^2, where Delta_bar divides each side's log-ratio by its
      completion token count (``chosen_lengths``, ``rejected_lengths``; both required).
    - ``"hinge"`` (SLiC, Zhao et al. 2023): L = relu(1 - beta Delta)
    - ``"robust"`` (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased loss when a
      fraction eps of the labels is flipped:
      L = ((1 - eps)(-log sigma(beta Delta)) + eps log sigma(-beta Delta)) / (1 - 2 eps)

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: [B] same for the rejected completions.
        ref_chosen_logps: [B] summed log-probs of the chosen completions under the reference.
        ref_rejected_logps: [B] same for the rejected completions.
        beta: inverse temperature of the implicit reward (strength of the KL anchor).
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: eps, the assumed label-flip rate; in [0, 0.5] for sigmoid, [0, 0.5)
            for robust, and must be 0 for ipo and hinge.
        chosen_lengths: [B] completion token counts of the chosen side (ipo only).
        rejected_lengths: [B] completion token counts of the rejected side (ipo only).

    Returns:
        losses: [B] per-pair losses (not reduced).
        chosen_rewards: [B] beta * (logpi(y_c) - logpi_ref(y_c)), detached (summed, not
            length-normalised, for every loss type).
        rejected_rewards: [B] beta * (logpi(y_r) - logpi_ref(y_r)), detached.
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    max_eps = _SMOOTHING_MAX.get(loss_type)
    if max_eps is None and label_smoothing != 0.0:
        raise ValueError(
            f"dpo_loss: label_smoothing applies to loss_type 'sigmoid' or 'robust' only, "
            f"got label_smoothing={label_smoothing} with loss_type={loss_type!r}"
        )
    if max_eps is not None:
        closed = loss_type == "sigmoid"
        if not (0.0 <= label_smoothing <= max_eps if closed else 0.0 <= label_smoothing < max_eps):
            bound = "0 <= eps <= 0.5" if closed else "0 <= eps < 0.5"
            raise ValueError(f"dpo_loss: label_smoothing for {loss_type!r} needs {bound}, got {label_smoothing}")
    _check_same_shape(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "dpo_loss: loss_type='ipo' needs chosen_lengths and rejected_lengths "
                "(completion token counts, shape [B]) to length-normalise each log-ratio"
            )
        _check_same_shape("dpo_loss", policy_chosen_logps=policy_chosen_logps,
                          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("dpo_loss: chosen_lengths and rejected_lengths must all be > 0 for 'ipo'")
        delta = chosen_ratio / chosen_lengths.to(chosen_ratio.dtype) - rejected_ratio / rejected_lengths.to(
            rejected_ratio.dtype
        )
    else:
        delta = chosen_ratio - rejected_ratio
    losses = _DPO_LOSSES[loss_type](delta, beta, label_smoothing)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen completions: the RPO term.

    Iterative RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") adds an NLL
    term on the chosen answer to the DPO loss, because DPO alone can lower the likelihood of the
    chosen answer as long as the rejected one falls faster, which degrades generations:

        L_RPO = L_DPO + alpha * NLL,   NLL = -logpi(y_c | x) / |y_c|

    Args:
        chosen_logps: [B] summed log-probs of the chosen completions under the policy.
        chosen_lengths: [B] their completion token counts (> 0).

    Returns:
        [B] per-pair NLL (a mean over the completion's tokens).
    """
    _check_same_shape("chosen_nll", chosen_logps=chosen_logps, chosen_lengths=chosen_lengths)
    return -chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1)
