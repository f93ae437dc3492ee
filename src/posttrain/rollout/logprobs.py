"""The training side of a rollout: per-token log-probs of the completion from one forward pass."""

from __future__ import annotations

import torch

from posttrain.losses.sft import IGNORE_INDEX
from posttrain.models.head import position_logps


def completion_logits(model, batch: dict) -> torch.Tensor:
    """Logits [N, C, V] that predict each completion token (prompt length P = total - C)."""
    C = batch["completion_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, logits_to_keep=C + 1)
    return out.logits[:, :-1]


def completion_logprobs(model, batch: dict, *, temperature: float = 1.0,
                        with_entropy: bool = False):
    """log softmax(z / temperature) of every completion token, [N, C] (0 on padding).

    This is what a rollout's `policy_logprobs` hold at sampling time; the two agree up to the
    numerical difference between a cached step-by-step pass and one full pass (measured in
    tests/rollout). With `with_entropy` also returns the per-token entropy [N, C] (detached). The
    head runs a chunk of positions at a time (posttrain.models.head): no [N, C, vocab] logits held.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    C, T = mask.shape[1], ids.shape[1]
    positions = torch.arange(T - C - 1, T - 1, device=ids.device)  # each predicts the next (completion) token
    targets = torch.where(mask, ids[:, -C:], torch.full_like(ids[:, -C:], IGNORE_INDEX))
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
    logp, ent = position_logps(model, inputs, positions, targets, temperature=temperature, with_entropy=with_entropy)
    return (logp, ent.detach()) if with_entropy else logp
