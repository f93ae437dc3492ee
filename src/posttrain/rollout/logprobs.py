"""The training side of a rollout: per-token log-probs of the completion from one forward pass."""

from __future__ import annotations

import torch


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
    tests/rollout). With `with_entropy` also returns the per-token entropy [N, C] (detached).
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    logits = completion_logits(model, batch).float()
    if temperature != 1.0:
        logits = logits / temperature
    ids = batch["input_ids"][:, -logits.shape[1]:]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    mask = batch["completion_mask"].bool()
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        ent = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
    return logp, torch.where(mask, ent, torch.zeros_like(ent))
