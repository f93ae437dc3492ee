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
    return target_nll(logits[:, :-1, :], labels[:, 1:])


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of already aligned targets: `logits[b, k]` predicts `targets[b, k]`.

    L_sum = - sum_{(b,k) : y_{b,k} != -100} log softmax(z_{b,k})[y_{b,k}]

    `token_nll` is this with the one-token shift; `next_token_targets` gives the aligned pairs
    for a forward that computed logits at a subset of positions only.

    Args:
        logits: [B, K, V]. targets: [B, K], IGNORE_INDEX where no loss falls.
    Returns:
        (loss_sum: scalar tensor, num_tokens: scalar long tensor)
    """
    mask = targets != IGNORE_INDEX
    n = mask.sum()
    if n == 0:
        return logits.sum() * 0.0, n
    # gather only the labelled positions: cheaper than a full [B,K,V] log-softmax in fp32
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), n


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits any row's loss needs, and the targets they predict.

    Position t predicts labels[:, t+1]; only positions where some row trains that next token
    are kept (the union over rows, so one index list serves the whole batch). On chat data
    most positions are prompt or padding, so a forward that computes the output head at
    these positions only (transformers' `logits_to_keep` as an index tensor) skips most of
    the head's matmul and its [B, T, V] logits, with the same loss and gradients:

        token_nll(logits, labels) == target_nll(logits[:, positions], targets)

    Args:
        labels: [B, T], IGNORE_INDEX where no loss falls.
    Returns:
        (positions: [K] long, sorted, in [0, T-1); targets: [B, K] = labels[:, positions + 1])
    """
    nxt = labels[:, 1:]
    positions = (nxt != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    return positions, nxt[:, positions]


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
