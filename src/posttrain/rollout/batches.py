"""A rollout's rows as optimizer steps: random minibatches, cut into micro-batches without dead columns."""

from __future__ import annotations

from typing import Optional

import torch


def minibatch_indices(n_rows: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random split of the rollout's rows into `minibatches` near-equal parts."""
    if minibatches > n_rows:
        raise ValueError(f"{minibatches} minibatches for a rollout of {n_rows} rows; lower the minibatch count")
    perm = torch.randperm(n_rows, generator=generator)
    return [p for p in torch.tensor_split(perm, minibatches)]


def micro_batches(tensors: dict, rows: torch.Tensor, size: int, extra: Optional[dict] = None) -> list[dict]:
    """Cut `rows` of the per-row tensors into micro-batches of at most `size` rows, trimming the
    columns that are padding in every row of a micro-batch (prompt left padding, completion tail)."""
    out = []
    for part in torch.split(rows, size):
        b = {k: v[part] for k, v in tensors.items()}
        am, cm = b["attention_mask"], b["completion_mask"]
        C = cm.shape[1]
        keep_c = int(cm.any(0).nonzero().max()) + 1 if cm.any() else 1
        P = am.shape[1] - C
        first = int(am[:, :P].any(0).nonzero().min()) if am[:, :P].any() else 0
        idx = torch.tensor(list(range(first, P)) + list(range(P, P + keep_c)))
        for k in ("input_ids", "attention_mask", "position_ids"):
            b[k] = b[k][:, idx]
        for k, v in list(b.items()):
            if k not in ("input_ids", "attention_mask", "position_ids") and v.dim() == 2 and v.shape[1] == C:
                b[k] = v[:, :keep_c]
        b["num_real_tokens"] = int(b["attention_mask"].sum())
        if extra:
            b.update(extra)
        out.append(b)
    return out
