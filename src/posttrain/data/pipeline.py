"""`build_dataset`: config -> validated, rendered, masked (and optionally packed) training data."""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from posttrain.data.collate import collate_packed, collate_padded, collate_padding_free
from posttrain.data.formats import Example, to_examples
from posttrain.data.mixing import mix_general
from posttrain.data.packing import pack_bfd, packing_efficiency
from posttrain.data.render import Tokenized, tokenize_examples
from posttrain.data.hub import as_list, describe, load_records
from posttrain.data.sources import DataError

log = logging.getLogger(__name__)


@dataclass
class DatasetBundle:
    """Training items (Tokenized, or packed rows = lists of Tokenized), held-out items, and what happened."""

    train: list
    eval: Optional[list]
    stats: dict
    collate: Callable[[list], dict]
    hashes: dict = field(default_factory=dict)
    packed: bool = False


def build_dataset(data_cfg, tokenizer, *, stage: str, seed: int = 0) -> DatasetBundle:
    """Read, validate, split, mix, tokenize and (optionally) pack the data of a run.

    stage "cpt": raw text only, always packed; texts longer than `max_length` are cut into
    consecutive `max_length` chunks (no text is thrown away). Any other stage ("sft", and later
    token-level stages built on it): any format; long examples are truncated or dropped per `data.overflow`.
    With `data.eval` unset and `eval_fraction > 0`, a seeded random `eval_fraction` of the training
    examples is held out (before mixing, so general data never lands in the held-out split).
    """
    if not data_cfg.train:
        raise DataError("no training data: set data.train (a file, a list of files, or gym:TASK)")
    if data_cfg.chat_template:
        # set on the tokenizer itself so the saved model's tokenizer renders chats as training did
        tokenizer.chat_template = data_cfg.chat_template
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")

    hashes: dict = {}
    stats: dict = {"stage": stage, "max_length": data_cfg.max_length, "overflow": data_cfg.overflow}
    # data.columns / data.streaming: read with getattr until DataConfig declares them (posttrain.data.hub)
    hub = dict(columns=getattr(data_cfg, "columns", None), streaming=getattr(data_cfg, "streaming", False))
    train = _load(data_cfg.train, data_cfg.format, "train", hashes, limit=data_cfg.limit, **hub)
    if data_cfg.limit:
        train = train[:data_cfg.limit]
    if data_cfg.eval:
        held = _load(data_cfg.eval, data_cfg.format, "validation", hashes, **hub)
    elif data_cfg.eval_fraction > 0:
        train, held = _split(train, data_cfg.eval_fraction, seed)
    else:
        held = None
    stats["rows"] = len(train)
    if data_cfg.mix is not None:
        general = _load(data_cfg.mix.data, "auto", "train", hashes, streaming=hub["streaming"])
        train, info = mix_general(train, general, data_cfg.mix.ratio, seed)
        stats.update(info)
        if info["mix_with_replacement"]:
            log.warning("data.mix: %d general examples requested, only %d available; sampled with replacement",
                        info["mix_general_used"], info["mix_general_available"])

    if stage == "cpt":
        bad = next((e for e in train + (held or []) if e.kind != "text"), None)
        if bad is not None:
            raise DataError(f"{bad.origin}: continued pretraining (cpt) trains on raw text ('text' field), got {bad.kind} data")
    packed = bool(data_cfg.packing) or stage == "cpt"
    kw = dict(max_length=data_cfg.max_length, overflow=data_cfg.overflow, split_long=stage == "cpt")
    train_items = tokenize_examples(train, tokenizer, stats=stats, **kw)
    if not train_items:
        raise DataError(f"no training examples left after tokenization ({_summary(stats)})")
    eval_items, eval_stats = None, {}
    if held is not None:
        eval_items = tokenize_examples(held, tokenizer, stats=eval_stats, **kw)
        stats["eval"] = eval_stats
    if packed:
        train_items = _pack(train_items, data_cfg.max_length, stats)
        if eval_items is not None:
            eval_items = _pack(eval_items, data_cfg.max_length, eval_stats)
        collate = functools.partial(collate_packed, pad_id=pad_id, row_len=data_cfg.max_length)
    elif data_cfg.padding_free:
        collate = functools.partial(collate_padding_free, pad_id=pad_id)
    else:
        collate = functools.partial(collate_padded, pad_id=pad_id)
    log.info("data: %s", _summary(stats))
    return DatasetBundle(train_items, eval_items, stats, collate, hashes, packed)


def _load(sources, fmt: str, split: str, hashes: dict, *, columns=None, streaming: bool = False,
          limit: Optional[int] = None) -> list[Example]:
    out: list[Example] = []
    for src in as_list(sources):
        # a streamed source stops after `limit` rows (a row may still be dropped later by validation)
        records, digest = load_records(src, split=split, columns=columns, streaming=streaming,
                                       limit=limit if streaming else None)
        hashes[str(describe(src))] = digest
        out.extend(to_examples(records, fmt))  # the format is detected per source file
    return out


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training data out of {len(examples)} examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def _pack(items: list[Tokenized], row_len: int, stats: dict) -> list[list[Tokenized]]:
    lengths = [len(x) for x in items]
    rows = pack_bfd(lengths, row_len)
    stats["packed_rows"] = len(rows)
    stats["packing_efficiency"] = round(packing_efficiency(lengths, rows, row_len), 4)
    return [[items[i] for i in row] for row in rows]


def _summary(stats: dict) -> str:
    keys = ("rows", "examples", "truncated", "dropped_overflow", "dropped_no_loss", "split_into_chunks",
            "system_folded", "loss_tokens", "packed_rows", "packing_efficiency", "mix_general_used")
    return ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)

