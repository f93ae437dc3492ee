"""Preference data as batches: loading the pairs of a run, and the collate functions of the
preference stages (dpo, kto, orpo, simpo, reward, safety's dpo form).

A batch of B pairs is ONE padded batch of 2B rows: the B chosen sequences, then the B rejected
ones, so the policy (and the reference) run one forward pass per micro-batch; with
`data.packing` whole pairs are packed into rows instead, and with `data.padding_free` each
batch's pairs are packed into rows of two longest pairs. KTO batches are B examples followed by
their B mismatched prompt/completion rows (for the KL reference point).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from posttrain.data.collate import collate_packed, collate_padded
from posttrain.data.packing import pack_bfd, packing_efficiency
from posttrain.data.preference import (
    mismatched, split_held_out, to_preference_examples, tokenize_pairs, tokenize_unpaired,
)
from posttrain.data.hub import as_list, describe, load_records
from posttrain.data.sources import DataError
from posttrain.losses.preference import mismatched_indices


def _load_examples(d, sources, kind: str, hashes: dict, stats: dict, split: str, limit=None) -> list:
    out: list = []
    for src in as_list(sources):  # files, gym:TASK, hf:ORG/NAME, datasets objects; data.columns applied
        records, hashes[str(describe(src))] = load_records(src, split=split, columns=d.columns,
                                                           streaming=d.streaming, limit=limit)
        out.extend(to_preference_examples(records, kind, stats))
    return out


def load_preference_data(d, tokenizer, kind: str, *, stage: str, seed: int) -> tuple[list, Optional[list], dict, dict]:
    """(train items, held-out items or None, stats, input hashes) of paired or unpaired data.

    `d` is the run's `data` section (posttrain.config.DataConfig)."""
    if not d.train:
        raise DataError("no training data: set data.train (a file, a list of files, or gym:preference)")
    if d.mix is not None:
        raise DataError(f"data.mix is not supported by the {stage} stage: general data has no preference "
                        "labels; remove data.mix")
    if d.chat_template:
        tokenizer.chat_template = d.chat_template
    hashes: dict = {}
    stats: dict = {"stage": stage, "max_length": d.max_length}
    eval_stats: dict = {}
    train = _load_examples(d, d.train, kind, hashes, stats, "train", limit=d.limit)
    if d.limit:
        train = train[:d.limit]
    if d.eval:
        held = _load_examples(d, d.eval, kind, hashes, eval_stats, "validation")
    elif d.eval_fraction > 0:
        train, held = split_held_out(train, d.eval_fraction, seed)
    else:
        held = None
    tok = tokenize_pairs if kind == "paired" else tokenize_unpaired
    stats["rows"] = len(train)
    train_items = tok(train, tokenizer, max_length=d.max_length, overflow=d.overflow, stats=stats)
    if not train_items:
        raise DataError(f"no training examples left after tokenization (max_length={d.max_length})")
    eval_items = None
    if held is not None:
        eval_items = tok(held, tokenizer, max_length=d.max_length, overflow=d.overflow, stats=eval_stats)
        stats["eval"] = eval_stats
    return train_items, eval_items, stats, hashes


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def _with_ref(batch: dict, pairs) -> dict:
    # precomputed reference log-probs ride along when every pair carries them
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])
    return batch


def collate_pairs(items, pad_id: int) -> dict:
    """B pairs -> one padded batch of 2B rows (chosen rows first), `num_pairs`, and `ref_logps` [2B]
    when every pair carries precomputed reference log-probs."""
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    batch = collate_padded(rows, pad_id)
    batch["num_pairs"] = len(items)
    batch["num_real_tokens"] = sum(len(r) for r in rows)
    return _with_ref(batch, items)


def pack_pairs(items: list, row_len: int, stats: dict) -> list[list]:
    """Best-fit-decreasing packing of whole pairs (both sides together) into rows of `row_len` tokens."""
    lengths = [len(p.chosen) + len(p.rejected) for p in items]
    rows = pack_bfd(lengths, row_len)
    stats["packed_rows"] = len(rows)
    stats["packing_efficiency"] = round(packing_efficiency(lengths, rows, row_len), 4)
    return [[items[i] for i in row] for row in rows]


def collate_preference(items, pad_id: int, row_len: Optional[int] = None, order: Optional[list[int]] = None) -> dict:
    """Pairs, or packed rows of pairs (lists), as one batch. Packed rows hold c1 r1 c2 r2 ... with
    attention kept inside each sequence (`collate_packed`); `segment_ids` [B,T] say which of the 2P
    sequences each token belongs to: the pair in slot k gives chosen k and rejected P + k. Slots
    follow the rows (row-major) unless `order` gives the slot of each pair in that order."""
    if not items or not isinstance(items[0], list):
        return collate_pairs(items, pad_id)
    pairs = [p for row in items for p in row]
    P = len(pairs)
    slots = list(range(P)) if order is None else list(order)
    batch = collate_packed([[x for p in row for x in (p.chosen, p.rejected)] for row in items], pad_id, row_len)
    seg = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for b, row in enumerate(items):
        s = 0
        for p in row:
            for side, x in ((slots[k], p.chosen), (P + slots[k], p.rejected)):
                seg[b, s:s + len(x)] = side
                s += len(x)
            k += 1
    batch.update(segment_ids=seg, num_pairs=P, num_real_tokens=int((seg >= 0).sum()))
    in_slots = [None] * P
    for k, p in enumerate(pairs):
        in_slots[slots[k]] = p
    return _with_ref(batch, in_slots)


def collate_pairs_padding_free(items, pad_id: int) -> dict:
    """The batch's pairs without padding to the longest sequence (`data.padding_free`): the same
    pairs, in the same order, and the same loss as `collate_pairs`, packed best-fit-decreasing into
    rows of twice the longest pair.

    One row of the whole batch would have no padding at all, but its dense [T, T] attention mask
    makes attention cost grow with the batch; rows of two longest pairs keep padding small (BFD)
    and attention close to the padded cost (DPO bench: 1.9x TRL's speed, docs/benchmarks.md).
    The pairs keep their slots (the precomputed reference log-probs are stored per slot).
    """
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in items]
    cap = min(2 * max(lengths), sum(lengths))
    bfd = pack_bfd(lengths, cap)
    rows = [[items[i] for i in row] for row in bfd]
    return collate_preference(rows, pad_id, row_len=cap, order=[i for row in bfd for i in row])


def collate_unpaired(items, pad_id: int, max_length: int) -> dict:
    """B examples followed by B mismatched rows (prompt i, completion of example i+1 mod B), `labels_kto` [B]."""
    rows = [x.item for x in items]
    # a held-out remainder of one example has no other completion; it is paired with its own
    idx = mismatched_indices(len(rows)).tolist() if len(rows) > 1 else [0]
    rows = rows + [mismatched(rows[i], rows[j], max_length) for i, j in enumerate(idx)]
    batch = collate_padded(rows, pad_id)
    batch["num_examples"] = len(items)
    batch["num_real_tokens"] = sum(len(r) for r in rows[:len(items)])
    batch["kto_labels"] = torch.tensor([x.label for x in items], dtype=torch.bool)
    return batch


def preference_collate(d, tokenizer, kind: str) -> Callable:
    """The collate function of a run's `data` section: paired (padded, packed or padding-free) or unpaired."""
    pad = pad_id_of(tokenizer)
    if kind == "paired":
        if d.padding_free:
            return functools.partial(collate_pairs_padding_free, pad_id=pad)
        return functools.partial(collate_preference, pad_id=pad, row_len=2 * d.max_length)
    if d.padding_free or d.packing:
        opt = "padding_free" if d.padding_free else "packing"
        raise DataError(f"data.{opt} is not supported by the kto stage (its batches pair examples across rows); "
                        f"set data.{opt}=false")
    return functools.partial(collate_unpaired, pad_id=pad, max_length=d.max_length)
