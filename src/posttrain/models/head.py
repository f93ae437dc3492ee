"""The output head at loss positions, chunked: the model body gives the hidden states where a loss
falls, and `posttrain.losses.chunked` applies the head to them a chunk of rows at a time, so a
stage never holds [tokens, vocab] logits (forward or backward).

The hidden states are taken from the model's own forward (its hooks, adapters and prompt/prefix
tuning included): a forward pre-hook on the output head records the head's input at the kept
positions and hands the head an empty slice instead, so the head itself computes nothing. The
plain path (materialised logits) is used where the head cannot be taken as one dense weight: a
model whose forward has no `logits_to_keep`, an adapted head (LoRA/DoRA on `lm_head`), a quantised
head, or a head sharded by FSDP2.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from posttrain.losses.chunked import IGNORE_INDEX, chunked_logps, chunked_nll
from posttrain.losses.sft import target_nll


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward accepts `logits_to_keep` (transformers' *ForCausalLM classes do)."""
    return "logits_to_keep" in inspect.signature(type(_unwrap(model)).forward).parameters


def _unwrap(model):
    # DistributedDataParallel's own forward takes *args, **kwargs and hides the model's signature
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class Head:
    """A dense output head: logits = softcap(h Wᵀ + b)."""

    module: nn.Linear
    weight: torch.Tensor  # [V, d]
    bias: Optional[torch.Tensor]  # [V] or None
    softcap: Optional[float]  # Gemma-2's final_logit_softcapping


def dense_head(model) -> Optional[Head]:
    """The model's output head as one dense weight, or None when the chunked path cannot use it."""
    inner = _unwrap(model)
    if not takes_logits_to_keep(inner) or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    # an adapted (LoraLinear) or quantised (NF4Linear) head is not an nn.Linear: its own forward is the truth
    if type(head) is not nn.Linear:
        return None
    w = head.weight
    vocab = getattr(inner.config, "vocab_size", None)
    if _is_sharded(w) or w.dim() != 2 or (vocab is not None and w.shape[0] != vocab):
        return None
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    return Head(head, w, head.bias, float(softcap) if softcap else None)


def _is_sharded(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def hidden_at(model, head: Head, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    """The output head's input at `positions` (transformers' `logits_to_keep` index tensor), [B, K, d].

    Runs the model's full forward, so adapters, prompt/prefix tuning (which shift the positions past
    their virtual tokens) and gradient checkpointing behave as in a plain call; the head itself is
    handed an empty slice and computes nothing.
    """
    seen = []

    def grab(module, args):
        seen.append(args[0])
        return (args[0][:, :0],)

    handle = head.module.register_forward_pre_hook(grab)
    try:
        model(**inputs, use_cache=False, logits_to_keep=positions)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"hidden_at: the output head ran {len(seen)} times in one forward, expected once")
    return seen[0]


def _plain_logits(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    if takes_logits_to_keep(model):
        return model(**inputs, use_cache=False, logits_to_keep=positions).logits
    return model(**inputs, use_cache=False).logits[:, positions]


def position_nll(model, inputs: dict, positions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Summed next-token NLL at `positions` and the number of loss tokens.

    The same numbers as `target_nll(model(**inputs, logits_to_keep=positions).logits, targets)`,
    with the head chunked where the model allows (see the module docstring).

    Args:
        inputs: the model's keyword inputs (input_ids, attention_mask, position_ids, ...).
        positions: [K] long, the positions whose logits the loss needs (`next_token_targets`).
        targets: [B, K] token ids, IGNORE_INDEX where no loss falls.
    Returns:
        (loss_sum: scalar, num_tokens: scalar long)
    """
    head = dense_head(model)
    if head is None:
        return target_nll(_plain_logits(model, inputs, positions), targets)
    h = hidden_at(model, head, inputs, positions)
    mask = targets != IGNORE_INDEX
    return chunked_nll(h[mask], head.weight, targets[mask], bias=head.bias, softcap=head.softcap)


def position_logps(model, inputs: dict, positions: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log softmax(z / temperature)[target] at `positions`, [B, K] fp32 (0 where IGNORE_INDEX).

    With `with_entropy` also the per-token entropy of softmax(z / temperature), [B, K] fp32 (0 where
    IGNORE_INDEX), differentiable; detach it where it is only logged. Drop-in for the log-softmax of
    `model(**inputs, logits_to_keep=positions).logits` (reference sequence log-probs, rollout
    scoring, the GRPO/PPO update), with the head chunked where the model allows.
    """
    if temperature <= 0:
        raise ValueError(f"position_logps: temperature must be > 0, got {temperature}")
    mask = targets != IGNORE_INDEX
    head = dense_head(model)
    if head is None:
        return _plain_logps(_plain_logits(model, inputs, positions), targets, mask, temperature, with_entropy)
    h = hidden_at(model, head, inputs, positions)
    lp, ent = chunked_logps(h[mask], head.weight, targets[mask], bias=head.bias, softcap=head.softcap,
                            temperature=temperature, with_entropy=with_entropy)
    logps = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    if not with_entropy:
        return logps, None
    return logps, torch.zeros(targets.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)


def _plain_logps(logits, targets, mask, temperature, with_entropy):
    z = logits[mask].float()
    if temperature != 1.0:
        z = z / temperature
    logp_all = F.log_softmax(z, -1)
    lp = logp_all.gather(-1, targets[mask][:, None])[:, 0]
    logps = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    if not with_entropy:
        return logps, None
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logps, torch.zeros(targets.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)
