"""Next-token losses for continued pretraining and supervised fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over the labelled tokens.

    L_sum = - sum_{t : y_{t+1} != -100} log p(y_{t+1} | y_{<=t})

    The sum (not the mean) is returned together with the token count, so the caller can
    normalize over every token of an optimizer step (all micro-batches, all ranks):
    mean-of-means over micro-batches would weight short and long batches unequally.

    Args:
        logits: [B, T, V] model outputs.
        labels: [B, T] token ids, IGNORE_INDEX where no loss falls. Position t's logits
            predict labels[t+1] (the shift happens here).
    Returns:
        (loss_sum: scalar tensor, num_tokens: scalar long tensor)
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n = mask.sum()
    if n == 0:
        return shift_logits.sum() * 0.0, n
    # gather only the labelled positions: cheaper than a full [B,T,V] log-softmax in fp32
    sel_logits = shift_logits[mask].float()
    sel_labels = shift_labels[mask]
    loss = F.cross_entropy(sel_logits, sel_labels, reduction="sum")
    return loss, n


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of the labelled tokens.

    logp(y|x) = sum_{t : y_{t+1} != -100} log p(y_{t+1} | y_{<=t})

    Returns (logps [B], num_tokens [B]); used by preference and RL stages.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0)
    tok_logps = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (tok_logps * mask).sum(-1), mask.sum(-1)
