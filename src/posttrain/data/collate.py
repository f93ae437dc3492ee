"""Batches as tensors: padded examples, or packed rows with attention kept inside each example.

transformers' sdpa and eager attention ignore packed `position_ids` when no mask is given, so a
naive packed forward lets each example attend to the ones before it in the row. A 4-D boolean
block-diagonal causal mask (True = may attend), passed with `position_ids` reset per example,
restores per-example attention exactly (docs/data.md, tests/data/test_packing_equivalence.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate_padded(items, pad_id: int) -> dict:
    """Right-padded batch: `input_ids`, `labels` (-100 on padding), `attention_mask` [B,T] (1 = real)."""
    T = max(len(x.input_ids) for x in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x.input_ids)
        input_ids[b, :n] = torch.tensor(x.input_ids)
        labels[b, :n] = torch.tensor(x.labels)
        attn[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn}


def collate_packed(rows, pad_id: int, row_len: int) -> dict:
    """Packed rows (each a list of `Tokenized`) as a batch of `row_len` tokens per row.

    Returns `input_ids`, `labels`, `position_ids` [B,T] and `attention_mask` [B,1,T,T] bool.
    - Each example's first token gets label -100: the previous example's last token must not be
      trained to predict it (the loss shifts labels by one).
    - Positions restart at 0 for every example (rotary embeddings see each example as if alone).
    - Padding attends only to itself: a fully masked row of the softmax would give NaN.
    Varlen flash-attention can recover the example boundaries from the `position_ids` resets.
    """
    B = len(rows)
    input_ids = torch.full((B, row_len), pad_id, dtype=torch.long)
    labels = torch.full((B, row_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, row_len), dtype=torch.long)
    seg = torch.full((B, row_len), -1, dtype=torch.long)  # example index within the row, -1 = padding
    for b, row in enumerate(rows):
        s = 0
        for j, x in enumerate(row):
            n = len(x.input_ids)
            if s + n > row_len:
                raise ValueError(f"row {b} holds {s + n} tokens > row_len {row_len}")
            input_ids[b, s:s + n] = torch.tensor(x.input_ids)
            labels[b, s:s + n] = torch.tensor(x.labels)
            labels[b, s] = IGNORE_INDEX
            position_ids[b, s:s + n] = torch.arange(n)
            seg[b, s:s + n] = j
            s += n
        position_ids[b, s:] = torch.arange(row_len - s)
    causal = torch.ones(row_len, row_len, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    eye = torch.eye(row_len, dtype=torch.bool)
    mask = (same & causal) | (eye & (seg < 0)[:, :, None])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask[:, None]}


def collate_padding_free(items, pad_id: int) -> dict:
    """The batch's examples side by side in one row of sum(lengths) tokens: no padding at all.

    The same examples and the same loss as `collate_padded` (one optimizer step sees the same
    batch), but the model runs on the real tokens only instead of B x max length: on chat data
    with uneven lengths that is ~1.5x fewer tokens through every linear layer, and activation
    memory shrinks with it. Attention stays inside each example through `collate_packed`'s
    block-diagonal mask; its [1, 1, T, T] size grows with the square of the row, so this suits
    batches of short examples (docs/benchmarks.md).
    """
    return collate_packed([list(items)], pad_id, sum(len(x.input_ids) for x in items))


def additive_mask(bool_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive float mask that `eager` attention expects.

    transformers' eager attention adds the mask to the scores, so a bool mask there would add 1.0
    instead of masking; sdpa accepts the bool mask as is.
    """
    zero = torch.zeros((), dtype=dtype)
    return torch.where(bool_mask, zero, torch.finfo(dtype).min)


def model_attention_mask(bool_mask: torch.Tensor, model) -> "torch.Tensor | None":
    """The packed-batch mask in the form `model`'s attention implementation needs.

    sdpa: the bool mask as is. eager: the additive float mask (a bool mask would be added to the
    scores as 1.0 and leak across examples; measured max |diff| 0.14-0.67 on the tiny models).
    flash_attention_*: None; transformers then finds the example boundaries from the position_ids
    resets and runs varlen attention.
    """
    # a DistributedDataParallel wrapper hides the model's config (packed batches under torchrun)
    config = getattr(model, "module", model).config
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if impl.startswith("flash"):
        return None
    if impl == "eager":
        return additive_mask(bool_mask, next(model.parameters()).dtype)
    return bool_mask
