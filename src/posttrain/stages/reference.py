"""Scoring sequences under the policy and the reference: summed completion log-probs from one
forward pass (padded or packed batches), and the three reference models of DPO/KTO.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from posttrain.losses.sft import next_token_targets

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _model_inputs(model, batch: dict) -> dict:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if inputs["attention_mask"].dim() == 4:
        from posttrain.data.collate import model_attention_mask

        inputs["attention_mask"] = model_attention_mask(inputs["attention_mask"], model)
    return inputs


def forward_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion token counts [N] of every sequence, one forward.

    Padded batches: one sequence per row. Packed batches: per `segment_ids` (N = 2 * num_pairs).
    The output head runs only at positions where some row has a completion token (as in SFT), and
    the log-softmax only at the completion tokens themselves: prompts and padding cost no head.
    """
    from posttrain.stages.sft import _takes_logits_to_keep

    inputs = _model_inputs(model, batch)
    if _takes_logits_to_keep(model):
        positions, targets = next_token_targets(batch["labels"])
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        seg_at = (lambda seg: seg[:, 1:][:, positions])
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        seg_at = (lambda seg: seg[:, 1:])
    mask = targets != -100
    tok = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    if "segment_ids" in batch:
        seq, n = seg_at(batch["segment_ids"])[mask], 2 * int(batch["num_pairs"])
    else:
        seq, n = mask.nonzero()[:, 0], targets.shape[0]
    logps = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
    counts = torch.zeros(n, dtype=torch.long, device=tok.device).index_add(0, seq, torch.ones_like(seq))
    return logps, counts


def forward_token_logprobs(model, batch: dict) -> torch.Tensor:
    """Full next-token log-distributions [N, T-1, V] (fp32), for the held-out KL."""
    out = model(**_model_inputs(model, batch), use_cache=False)
    return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)


class Reference:
    """The reference policy of DPO/KTO: `adapter` (the policy with its adapter disabled), `copy`
    (a frozen deep copy made before training) or `precomputed` (log-probs cached on disk; no
    reference model in memory)."""

    MODES = ("adapter", "copy", "precomputed")

    def __init__(self, mode: str, policy):
        if mode not in self.MODES:
            raise ValueError(f"reference must be one of {', '.join(self.MODES)}, got {mode!r}")
        from posttrain.models import adapters

        if mode == "adapter" and not adapters.is_adapted(policy):
            raise ValueError("reference 'adapter' needs an adapter run (adapter.type lora, ...): the reference is "
                             "the policy with its adapter disabled. Use reference 'copy' or 'precomputed' for "
                             "full fine-tuning")
        self.mode = mode
        self.model = None
        if mode == "copy":
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    def _context(self, policy):
        import contextlib

        from posttrain.models import adapters

        if self.mode == "copy":
            return self.model, contextlib.nullcontext()
        return policy, adapters.disabled(policy)

    @torch.no_grad()
    def logps(self, policy, batch: dict) -> torch.Tensor:
        if self.mode == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError("reference 'precomputed': the batch has no cached reference log-probs")
            return batch["ref_logps"].float()
        model, ctx = self._context(policy)
        with ctx:
            return forward_logps(model, batch)[0]

    @torch.no_grad()
    def token_logprobs(self, policy, batch: dict) -> Optional[torch.Tensor]:
        """The reference's full next-token log-distributions, or None when it is not in memory."""
        from posttrain.models import adapters

        if self.mode == "precomputed" and not adapters.is_adapted(policy):
            return None
        model, ctx = self._context(policy) if self.mode != "precomputed" else (policy, adapters.disabled(policy))
        with ctx:
            return forward_token_logprobs(model, batch)


def _items_hash(items) -> str:
    h = hashlib.sha256()
    for p in items:
        h.update(json.dumps([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels]).encode())
    return h.hexdigest()


@torch.no_grad()
def precompute_reference(model, splits: dict[str, list], collate: Callable, *, batch_size: int, path: Path,
                         model_id: str, autocast=None) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, computed once with `model` (its adapter disabled, if any) and
    cached in `path` (safetensors; reused when the data and model are unchanged). Sets `item.ref`.

    Under torchrun each rank scores its share of the batches (before the model is wrapped, so no
    collective per forward), the shares are all-gathered, and rank 0 alone writes the file."""
    from safetensors.torch import load_file, save_file

    from posttrain.engine import dist
    from posttrain.models import adapters

    key = {name: _items_hash(items) for name, items in splits.items()}
    meta = {"model": model_id, **{f"hash_{k}": v for k, v in key.items()}}
    cached = None
    # under torchrun every rank takes the same branch: none may see a file another rank is writing
    dist.barrier()
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                cached = load_file(str(path))
    if cached is None:
        was = model.training
        model.eval()
        cached = {}
        ctx = autocast or (lambda: torch.autocast("cpu", enabled=False))
        device = next(model.parameters()).device
        # each rank scores every world_size-th chunk; the chunks are gathered back in order
        me, w = dist.rank(), dist.world_size()
        with adapters.disabled(model):
            for name, items in splits.items():
                mine = {}
                starts = list(range(0, len(items), batch_size))
                for s in starts[me::w]:
                    chunk = items[s:s + batch_size]
                    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(chunk).items()}
                    with ctx():
                        lp = forward_logps(model, b)[0].float().cpu()
                    mine[s] = torch.stack([lp[:len(chunk)], lp[len(chunk):]], dim=1)
                for part in dist.all_gather_object(mine):
                    mine.update(part)
                cached[name] = torch.cat([mine[s] for s in starts]) if starts else torch.zeros(0, 2)
        model.train(was)
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(cached, str(path), metadata=meta)
        dist.barrier()
    for name, items in splits.items():
        for p, (c, r) in zip(items, cached[name].tolist()):
            p.ref = (c, r)
    return cached
