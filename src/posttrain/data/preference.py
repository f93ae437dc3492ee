"""Preference data: validated pairs and unpaired thumbs-up/down rows, tokenized for one forward pass.

=========  ===============================================================================
format     fields of the row
=========  ===============================================================================
paired     ``chosen``, ``rejected`` and usually ``prompt``. Plain text (three strings) or
           conversational (``prompt`` a list of messages; ``chosen``/``rejected`` lists of
           messages or bare strings, which become one assistant turn). Without ``prompt``,
           ``chosen`` and ``rejected`` are whole conversations and their shared message
           prefix is the prompt.
unpaired   ``prompt``, ``completion``, ``label`` (bool: True = desirable). For KTO.
=========  ===============================================================================

Each side is rendered exactly as SFT renders a prompt-completion example
(`posttrain.data.render`), so labels are -100 everywhere except on completion tokens and the
log-prob of a completion is the sum over those tokens only. Paired data converts to unpaired
(chosen -> desirable, rejected -> undesirable) for KTO.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

from posttrain.data.formats import Example, to_example
from posttrain.data.render import IGNORE_INDEX, Tokenized, tokenize_examples
from posttrain.data.sources import DataError, Record
from posttrain.data.pipeline import _split

log = logging.getLogger(__name__)


class TiedPair(DataError):
    """A pair whose two answers are identical: it carries no preference (and a zero DPO gradient)."""


@dataclass
class PairExample:
    origin: str
    chosen: Example  # prompt_completion, completion = the chosen answer
    rejected: Example


@dataclass
class UnpairedExample:
    origin: str
    example: Example
    label: bool


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    origin: str
    ref: Optional[tuple[float, float]] = None  # precomputed reference log-probs (chosen, rejected)


@dataclass
class TokenizedUnpaired:
    item: Tokenized
    label: bool
    origin: str


def detect_preference_format(data: dict) -> str:
    """'paired', 'unpaired' or '' from a row's fields."""
    if "chosen" in data or "rejected" in data:
        return "paired"
    if "label" in data or "completion" in data:
        return "unpaired"
    return ""


def _renamed(err: DataError, field: str) -> DataError:
    # formats.to_example names the completion field 'completion'; say which side it was
    return DataError(re.sub(r"\bcompletion\b", field, str(err)))


def _side(prompt: Any, completion: Any, field: str, rec: Record) -> Example:
    if completion is None:
        raise DataError(f"{rec.origin}: missing field '{field}' (preference data)")
    try:
        return to_example(Record({"prompt": prompt, "completion": completion}, rec.origin), "prompt_completion")
    except DataError as e:
        raise _renamed(e, field) from None


def _shared_prefix(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(conv, list):
            raise DataError(f"{where}: missing field 'prompt'; without it {name} must be a whole conversation "
                            f"(a list of messages), got {type(conv).__name__}")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: missing field 'prompt', and chosen and rejected share no leading message "
                        "to take as the prompt")
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: chosen and rejected are identical after their shared prefix of {n} message(s); "
                        "a preference pair needs two different answers")
    return chosen[:n], chosen[n:], rejected[n:]


def to_pair(rec: Record) -> PairExample:
    """Validate one paired row; raises `DataError` naming the origin and the field."""
    data, where = rec.data, rec.origin
    for key in ("chosen", "rejected"):
        if key not in data:
            raise DataError(f"{where}: missing field '{key}' (preference data)")
    if "prompt" in data and data["prompt"] is not None:
        prompt, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
    else:
        prompt, chosen, rejected = _shared_prefix(data["chosen"], data["rejected"], where)
    c = _side(prompt, chosen, "chosen", rec)
    r = _side(prompt, rejected, "rejected", rec)
    if c.completion == r.completion:
        raise TiedPair(f"{where}: chosen and rejected are the same answer; a preference pair needs two different ones")
    return PairExample(where, c, r)


def to_unpaired(rec: Record) -> UnpairedExample:
    data, where = rec.data, rec.origin
    for key in ("prompt", "completion", "label"):
        if key not in data:
            raise DataError(f"{where}: missing field '{key}' (unpaired preference data)")
    label = data["label"]
    if not isinstance(label, bool):
        # CSV cells and some exports spell booleans as text or 0/1
        norm = {"true": True, "false": False, "1": True, "0": False}.get(str(label).strip().lower())
        if norm is None or isinstance(label, float):
            raise DataError(f"{where}: label must be a bool (true = desirable), got {label!r}")
        label = norm
    return UnpairedExample(where, _side(data["prompt"], data["completion"], "completion", rec), label)


def to_preference_examples(records: list[Record], kind: str, stats: Optional[dict] = None) -> list:
    """Validate rows as `kind` ('paired' or 'unpaired'); paired rows become unpaired when kind is 'unpaired'.

    Pairs with identical answers are skipped, counted in ``stats["dropped_tied_pairs"]`` and logged;
    any other bad row raises `DataError`.
    """
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    stats = stats if stats is not None else {}
    tied: list[str] = []
    out: list = []
    for rec in records:
        got = detect_preference_format(rec.data)
        if not got:
            raise DataError(f"{rec.origin}: not preference data: expected 'chosen' + 'rejected' (paired) or "
                            f"'prompt' + 'completion' + 'label' (unpaired), got fields {sorted(rec.data)}")
        if got == "unpaired" and kind == "paired":
            raise DataError(f"{rec.origin}: unpaired row (prompt, completion, label) but this stage trains on pairs "
                            "(prompt, chosen, rejected); use the kto stage for unpaired data")
        if got == "paired":
            try:
                pair = to_pair(rec)
            except TiedPair:
                tied.append(rec.origin)
                continue
            out.extend([pair] if kind == "paired" else pair_to_unpaired(pair))
        else:
            out.append(to_unpaired(rec))
    if tied:
        stats["dropped_tied_pairs"] = stats.get("dropped_tied_pairs", 0) + len(tied)
        log.warning("%d pair(s) with identical chosen and rejected answers were skipped (e.g. %s)",
                    len(tied), "; ".join(tied[:3]))
    return out


def pair_to_unpaired(pair: PairExample) -> list[UnpairedExample]:
    """A pair as two unpaired examples: chosen desirable, rejected undesirable (KTO paper, section 4)."""
    return [UnpairedExample(pair.origin + " (chosen)", pair.chosen, True),
            UnpairedExample(pair.origin + " (rejected)", pair.rejected, False)]


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of `examples` held out (at least one, never all); same rule as SFT data."""
    return _split(examples, fraction, seed)


def _with_origin(ex: Example, origin: str) -> Example:
    return Example(ex.kind, origin, text=ex.text, prompt=ex.prompt, completion=ex.completion,
                   messages=ex.messages, tools=ex.tools)


def tokenize_pairs(pairs: list[PairExample], tokenizer, *, max_length: int, overflow: str = "truncate",
                   stats: Optional[dict] = None) -> list[TokenizedPair]:
    """Tokenize both sides of every pair (batched); a pair loses both sides when either is dropped."""
    stats = stats if stats is not None else {}
    flat = []
    for i, p in enumerate(pairs):
        flat.append(_with_origin(p.chosen, f"{i}\x00c"))
        flat.append(_with_origin(p.rejected, f"{i}\x00r"))
    toks = {t.origin: t for t in tokenize_examples(flat, tokenizer, max_length=max_length, overflow=overflow,
                                                   stats=stats)}
    out = []
    for i, p in enumerate(pairs):
        c, r = toks.get(f"{i}\x00c"), toks.get(f"{i}\x00r")
        if c is None or r is None:
            stats["dropped_pairs"] = stats.get("dropped_pairs", 0) + 1
            continue
        c.origin, r.origin = p.origin + " (chosen)", p.origin + " (rejected)"
        out.append(TokenizedPair(c, r, p.origin))
    stats["pairs"] = len(out)
    return out


def tokenize_unpaired(examples: list[UnpairedExample], tokenizer, *, max_length: int, overflow: str = "truncate",
                      stats: Optional[dict] = None) -> list[TokenizedUnpaired]:
    stats = stats if stats is not None else {}
    flat = [_with_origin(u.example, f"{i}") for i, u in enumerate(examples)]
    toks = {t.origin: t for t in tokenize_examples(flat, tokenizer, max_length=max_length, overflow=overflow,
                                                   stats=stats)}
    out = []
    for i, u in enumerate(examples):
        t = toks.get(str(i))
        if t is not None:
            t.origin = u.origin
            out.append(TokenizedUnpaired(t, u.label, u.origin))
    stats["desirable"] = sum(x.label for x in out)
    stats["undesirable"] = len(out) - stats["desirable"]
    return out


def completion_start(item: Tokenized) -> int:
    """Index of the first trained token: everything before it is the prompt (chat header included)."""
    for t, lab in enumerate(item.labels):
        if lab != IGNORE_INDEX:
            return t
    return len(item.labels)


def mismatched(prompt_of: Tokenized, completion_of: Tokenized, max_length: int) -> Tokenized:
    """`prompt_of`'s prompt followed by `completion_of`'s completion (KTO's KL estimate), cut at max_length."""
    p, c = completion_start(prompt_of), completion_start(completion_of)
    ids = prompt_of.input_ids[:p] + completion_of.input_ids[c:]
    labels = [IGNORE_INDEX] * p + completion_of.labels[c:]
    return Tokenized(ids[:max_length], labels[:max_length], f"{prompt_of.origin} x {completion_of.origin}")
