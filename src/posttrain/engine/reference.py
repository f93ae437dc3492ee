"""Scoring sequences under the policy and the reference, in one place: summed completion log-probs
from one forward pass (padded or packed batches, the head only at loss positions), and the one
reference-model implementation of DPO, KTO, PPO and GRPO in its three modes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from posttrain.data.collate import model_attention_mask
from posttrain.engine import dist
from posttrain.engine.precision import autocast
from posttrain.losses.sft import next_token_targets
from posttrain.models import adapters
from posttrain.models.head import position_logps, takes_logits_to_keep

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _model_inputs(model, batch: dict) -> dict:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if inputs["attention_mask"].dim() == 4:
        inputs["attention_mask"] = model_attention_mask(inputs["attention_mask"], model)
    return inputs


def forward_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion token counts [N] of every sequence, one forward.

    Padded batches: one sequence per row. Packed batches: per `segment_ids` (N = 2 * num_pairs).
    The output head runs only at positions where some row has a completion token (as in SFT), and
    the log-softmax only at the completion tokens themselves: prompts and padding cost no head.
    """
    inputs = _model_inputs(model, batch)
    if takes_logits_to_keep(model):
        # the head a chunk of positions at a time (posttrain.models.head): no [tokens, vocab] logits held
        positions, targets = next_token_targets(batch["labels"])
        mask = targets != -100
        tok = position_logps(model, inputs, positions, targets)[0][mask]
        seg_at = (lambda seg: seg[:, 1:][:, positions])
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        tok = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
        seg_at = (lambda seg: seg[:, 1:])
    if "segment_ids" in batch:
        seq, n = seg_at(batch["segment_ids"])[mask], 2 * int(batch["num_pairs"])
    else:
        seq, n = mask.nonzero()[:, 0], targets.shape[0]
    logps = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
    counts = torch.zeros(n, dtype=torch.long, device=tok.device).index_add(0, seq, torch.ones_like(seq))
    return logps, counts


def forward_mean_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean completion log-prob per token [N], summed log-probs [N], token counts [N]): the
    length-normalised score of SimPO and ORPO."""
    logps, counts = forward_logps(model, batch)
    return logps / counts.clamp(min=1), logps, counts


def forward_token_logprobs(model, batch: dict) -> torch.Tensor:
    """Full next-token log-distributions [N, T-1, V] (fp32), for the held-out KL."""
    out = model(**_model_inputs(model, batch), use_cache=False)
    return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)


class Reference:
    """The frozen reference policy, in one of three modes:

    - `adapter`: the policy itself with its adapter disabled (no second model in memory);
    - `copy`: a frozen copy of the starting weights, made when the Reference is built (before a
      resumed run restores its checkpoint) or loaded by `copy_from()` (RL stages reload the
      starting checkpoint from disk, which also works once the policy is wrapped for DDP/FSDP);
    - `precomputed`: sequence log-probs computed once before training and carried in the batch
      (`ref_logps`); no reference model in memory.
    """

    MODES = ("adapter", "copy", "precomputed")

    def __init__(self, mode: str, policy, *, copy_from: Optional[Callable[[], torch.nn.Module]] = None):
        if mode not in self.MODES:
            raise ValueError(f"reference must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "adapter" and not adapters.is_adapted(policy):
            raise ValueError("reference 'adapter' needs an adapter run (adapter.type lora, ...): the reference is "
                             "the policy with its adapter disabled. Use reference 'copy' or 'precomputed' for "
                             "full fine-tuning")
        self.mode = mode
        self.model = None
        if mode == "copy":
            ref = copy_from() if copy_from is not None else copy.deepcopy(policy)
            self.model = ref.eval().requires_grad_(False)

    @classmethod
    def default_mode(cls, adapter_type: str) -> str:
        """`adapter` for adapter runs (no second model), `copy` for full fine-tuning."""
        return "adapter" if adapter_type != "none" else "copy"

    @contextlib.contextmanager
    def context(self, policy):
        """Inside the block, the yielded module computes the reference: the copy, or the adapter-disabled
        policy (also for `precomputed` on an adapter run, where that model is at hand)."""
        if self.model is not None:
            yield self.model
            return
        if not adapters.is_adapted(policy):
            raise RuntimeError("reference 'precomputed' of a full fine-tune has no model in memory")
        with adapters.disabled(policy):
            yield policy

    @torch.no_grad()
    def logps(self, policy, batch: dict) -> torch.Tensor:
        """Summed completion log-probs [N] of the batch's sequences under the reference."""
        if self.mode == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError("reference 'precomputed': the batch has no cached reference log-probs")
            return batch["ref_logps"].float()
        with self.context(policy) as ref:
            return forward_logps(ref, batch)[0]

    @torch.no_grad()
    def token_logprobs(self, policy, batch: dict) -> Optional[torch.Tensor]:
        """The reference's full next-token log-distributions, or None when it is not in memory."""
        if self.mode == "precomputed" and not adapters.is_adapted(policy):
            return None
        with self.context(policy) as ref:
            return forward_token_logprobs(ref, batch)


def _items_hash(items) -> str:
    h = hashlib.sha256()
    for p in items:
        h.update(json.dumps([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels]).encode())
    return h.hexdigest()


@torch.no_grad()
def precompute_reference(model, splits: dict[str, list], collate: Callable, *, batch_size: int, path: Path,
                         model_id: str, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, computed once with `model` (its adapter disabled, if any) and
    cached in `path` (safetensors; reused when the data and model are unchanged). Sets `item.ref`.

    Under torchrun each rank scores its share of the batches (before the model is wrapped, so no
    collective per forward), the shares are all-gathered, and rank 0 alone writes the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = {name: _items_hash(items) for name, items in splits.items()}
    meta = {"model": model_id, **{f"hash_{k}": v for k, v in key.items()}}
    cached = None
    # under torchrun every rank takes the same branch: none may see a file another rank is writing
    dist.barrier()
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                cached = load_file(str(path))
    if cached is None:
        was = model.training
        model.eval()
        cached = {}
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
                    with autocast(precision, device):
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
