"""General-text perplexity change: the model's perplexity on held-out general text (the user's
`data.mix` data, else the bundled paragraphs in eval/prompts/general_text.jsonl) against the base's.
A blow-up tripwire beside the drift measure (posttrain.eval.drift); docs/eval.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from posttrain.eval.drift import CACHE_VERSION, GENERAL_TEXT, _batches, _pad_id, cache_dir, fingerprint
from posttrain.data.formats import to_example
from posttrain.data.render import IGNORE_INDEX, tokenize_examples
from posttrain.data.sources import read_records
from posttrain.models import adapters

@dataclass
class TextReference:
    """Held-out general text as (token ids, first scored position) rows, and the base's perplexity on it."""

    rows: list[list[int]]
    start: list[int]  # tokens before this index are context only (the prompt of a chat row)
    base_ppl: float
    source: str


def general_text_rows(tokenizer, source=None, *, n: int = 64,
                      max_length: int = 256) -> tuple[list[list[int]], list[int], str]:
    """Token rows of held-out general text: `source` (a data file or rows, e.g. `data.mix.data`),
    else the bundled paragraphs. At most `n` rows, spread evenly over the source. Rows are rendered
    as training renders them (data/render.py), and only their loss tokens are scored, so a chat row's
    prompt is context."""

    if source is None:
        source, name = str(GENERAL_TEXT), "bundled general_text.jsonl"
    else:
        name = ", ".join(source) if isinstance(source, (list, tuple)) else str(source)
    sources = source if isinstance(source, (list, tuple)) and source and not isinstance(source[0], dict) else [source]
    records = [r for s in sources for r in read_records(s)]
    records = [records[math.floor(i * len(records) / n)] for i in range(min(n, len(records)))]
    toks = tokenize_examples([to_example(r) for r in records], tokenizer, max_length=max_length)
    if not toks:
        raise ValueError(f"general text {name}: no rows with tokens to score")
    rows, start = [], []
    for t in toks:
        first = next(i for i, y in enumerate(t.labels) if y != IGNORE_INDEX and i > 0)
        rows.append(list(t.input_ids))
        start.append(first)
    return rows, start, name


@torch.inference_mode()
def nll_sums(model, rows: Sequence[list[int]], start: Sequence[int], *, batch_size: int = 16,
             pad_id: int = 0) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of tokens) over the scored tokens of `rows` (positions >= start[r])."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for idx in _batches(len(rows), batch_size):
            idx = list(idx)
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                row = torch.tensor(rows[i])
                ids[r, :len(row)] = row
                labels[r, start[i]:len(row)] = row[start[i]:]
                mask[r, :len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            tgt = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                  reduction="sum")
            total += float(nll)
            count += int((tgt != -100).sum())
    finally:
        model.train(was)
    return total, count


def mean_nll(model, rows: Sequence[list[int]], start: Sequence[int], *, batch_size: int = 16, pad_id: int = 0) -> float:
    """Mean next-token NLL (nats) over the scored tokens of `rows` (positions >= start[r])."""
    total, count = nll_sums(model, rows, start, batch_size=batch_size, pad_id=pad_id)
    return total / max(count, 1)


def _nll_path(base_fingerprint: str, rows, start, batch_size: int, pad_id: int) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "sums": True, "base": base_fingerprint, "rows": rows, "start": start,
                      "batch_size": batch_size, "pad": pad_id})
    key = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / f"ppl-{key}.json"


def cached_base_nll(base_fingerprint: str, rows, start, *, batch_size: int = 16,
                    pad_id: int = 0) -> Optional[tuple[float, int]]:
    """The base's `nll_sums` on these rows from the cache, or None (absent, truncated or foreign)."""
    try:
        d = json.loads(_nll_path(base_fingerprint, rows, start, batch_size, pad_id).read_text())
        total, count = d["total"], d["count"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (float(total), int(count)) if isinstance(total, (int, float)) and isinstance(count, int) else None


def base_nll(model, rows, start, *, base_fingerprint: str, batch_size: int = 16, pad_id: int = 0,
             cache: bool = True) -> tuple[float, int]:
    """The base's (adapters disabled) `nll_sums` on `rows`, cached beside the drift references under a key
    that hashes the base, the rows and the batching (a float's JSON form is exact: the same number)."""
    got = cached_base_nll(base_fingerprint, rows, start, batch_size=batch_size, pad_id=pad_id) if cache else None
    if got is not None:
        return got
    with adapters.disabled(model):
        got = nll_sums(model, rows, start, batch_size=batch_size, pad_id=pad_id)
    if cache:
        path = _nll_path(base_fingerprint, rows, start, batch_size, pad_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"total": got[0], "count": got[1]}))
        os.replace(tmp, path)  # atomic, as the drift references
    return got


def text_reference(model, tokenizer, source=None, *, n: int = 64, max_length: int = 256,
                   batch_size: int = 16, cache: bool = True) -> TextReference:
    """General-text rows and the base's perplexity on them (adapters disabled).

    The base's NLL is a function of the base weights, the tokenizer, the rows and the batching, so it
    is cached (`base_nll`): a run on a base seen before skips these forwards (0.6 s on the bundled
    model, docs/benchmarks.md), with the same number.
    """
    rows, start, name = general_text_rows(tokenizer, source, n=n, max_length=max_length)
    total, count = base_nll(model, rows, start, base_fingerprint=fingerprint(model, tokenizer), batch_size=batch_size,
                            pad_id=_pad_id(tokenizer), cache=cache)
    return TextReference(rows, start, math.exp(total / max(count, 1)), name)


def perplexity_change(model, ref: TextReference, *, batch_size: int = 16, pad_id: int = 0) -> dict:
    """{"general_ppl", "general_ppl_base", "general_ppl_change" = ppl / ppl_base − 1}."""
    ppl = math.exp(mean_nll(model, ref.rows, ref.start, batch_size=batch_size, pad_id=pad_id))
    return {"general_ppl": ppl, "general_ppl_base": ref.base_ppl, "general_ppl_change": ppl / ref.base_ppl - 1.0}
