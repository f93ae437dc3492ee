"""`posttrain data check`: the data problems that make a fine-tune or its numbers wrong, each with origins.

- exact duplicates: the same example after lower-casing and collapsing whitespace;
- near duplicates: word 5-gram shingles, MinHash (64 hashes) with LSH banding (16 bands of 4) to find
  candidates, kept when their exact Jaccard similarity is at least `near_threshold` (Broder 1997,
  "On the resemblance and containment of documents"; the dedup of Lee et al. 2022, "Deduplicating
  Training Data Makes Language Models Better");
- contamination: a held-out example whose word 13-grams appear in the training data (the overlap
  test of Brown et al. 2020, "Language Models are Few-Shot Learners", appendix C); flagged when at
  least `contamination_threshold` of its 13-grams do (examples under 13 words: an exact match);
- length: token lengths as training renders them, examples longer than `data.max_length`
  (truncated), outliers beyond Tukey's far-out fences (Q1 - 3·IQR, Q3 + 3·IQR) widened to a
  quarter and four times the median (so a second mode of lengths is not flagged), examples with
  no trained token;
- rows the format validator or the template audit (`posttrain.data.audit`) rejects.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from posttrain.data.formats import Example, to_example
from posttrain.data.sources import DataError, Record

_WORD = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks ("1 + 0" is not "1 - 0")
NUM_HASHES, BANDS = 64, 16
_PRIME = (1 << 61) - 1


@dataclass
class QualityReport:
    counts: dict = field(default_factory=dict)
    exact_duplicates: list[list[str]] = field(default_factory=list)  # groups of origins
    near_duplicates: list[dict] = field(default_factory=list)  # {"a", "b", "jaccard"}
    contamination: list[dict] = field(default_factory=list)  # {"eval", "train", "overlap"}
    length_outliers: list[dict] = field(default_factory=list)  # {"origin", "tokens", "why"}
    truncated: list[dict] = field(default_factory=list)  # {"origin", "tokens"}
    invalid: list[dict] = field(default_factory=list)  # {"origin", "check", "message"}

    def to_json(self) -> dict:
        return {"counts": self.counts, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates, "contamination": self.contamination,
                "length_outliers": self.length_outliers, "truncated": self.truncated, "invalid": self.invalid}


def example_text(ex: Example) -> str:
    """Everything an example says, prompt and answer, as one string (what duplicates are judged on)."""
    if ex.kind == "text":
        return ex.text
    parts = []
    for side in (ex.prompt, ex.completion, ex.messages):
        if isinstance(side, str):
            parts.append(side)
        elif isinstance(side, list):
            parts += [str(m.get("content") or "") for m in side]
    return "\n".join(parts)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def _shingles(words: list[str], n: int) -> set[int]:
    if len(words) < n:
        return {_h(" ".join(words))}
    return {_h(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def minhash(shingles: set[int], seeds: np.ndarray) -> np.ndarray:
    """NUM_HASHES minima of (a·x + b) mod p over the shingle hashes."""
    x = np.fromiter(shingles, dtype=np.uint64, count=len(shingles)) % np.uint64(_PRIME)
    a, b = seeds[:, :1], seeds[:, 1:]
    # products overflow uint64; the wrap-around is still a fixed hash family per seed
    return ((a * x[None, :] + b) % np.uint64(_PRIME)).min(axis=1)


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.8, n: int = 5) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard) of examples whose word n-gram shingle sets overlap at least `threshold`."""
    sets = [_shingles(_words(t), n) for t in texts]
    seeds = np.random.default_rng(0).integers(1, _PRIME, size=(NUM_HASHES, 2), dtype=np.uint64)
    rows = NUM_HASHES // BANDS
    buckets: dict = {}
    for i, s in enumerate(sets):
        sig = minhash(s, seeds)
        for b in range(BANDS):
            buckets.setdefault((b, sig[b * rows:(b + 1) * rows].tobytes()), []).append(i)
    cands = {(a, b) for ids in buckets.values() if len(ids) > 1 for k, a in enumerate(ids) for b in ids[k + 1:]}
    out = []
    for a, b in sorted(cands):
        j = len(sets[a] & sets[b]) / len(sets[a] | sets[b])
        if j >= threshold:
            out.append((a, b, j))
    return out


def contamination(train_texts: Sequence[str], eval_texts: Sequence[str], *, n: int = 13,
                  threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """(eval index, a train index sharing its n-grams, share of its n-grams seen in training)."""
    seen: dict[int, int] = {}
    for i, t in enumerate(train_texts):
        for g in _shingles(_words(t), n):
            seen.setdefault(g, i)
    out = []
    for j, t in enumerate(eval_texts):
        grams = _shingles(_words(t), n)
        hits = [seen[g] for g in grams if g in seen]
        share = len(hits) / len(grams) if grams else 0.0
        if hits and share >= threshold:
            out.append((j, statistics.mode(hits), share))
    return out


def _examples(records: Sequence[Record], report: QualityReport) -> list[Example]:
    out = []
    for r in records:
        try:
            out.append(to_example(r))
        except DataError as e:
            report.invalid.append({"origin": r.origin, "check": "format", "message": str(e)})
    return out


def check_data(train: Sequence[Record], held_out: Optional[Sequence[Record]] = None, *, tokenizer=None,
               max_length: int = 1024, near_threshold: float = 0.8,
               contamination_threshold: float = 0.5) -> QualityReport:
    """Every check on `train` (and the train/held-out overlap); lengths and the audit need a tokenizer."""
    rep = QualityReport()
    exs = _examples(train, rep)
    held = _examples(held_out, rep) if held_out else []
    texts = [example_text(e) for e in exs]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(" ".join(t.lower().split()), []).append(i)
    dup_groups = [g for g in groups.values() if len(g) > 1]
    rep.exact_duplicates = [[exs[i].origin for i in g] for g in dup_groups]
    first = {i: g[0] for g in groups.values() for i in g}
    for a, b, j in near_duplicate_pairs(texts, near_threshold):
        if first[a] != first[b]:  # exact duplicates are reported above
            rep.near_duplicates.append({"a": exs[a].origin, "b": exs[b].origin, "jaccard": round(j, 3)})
    if held:
        for j, i, share in contamination(texts, [example_text(e) for e in held],
                                         threshold=contamination_threshold):
            rep.contamination.append({"eval": held[j].origin, "train": exs[i].origin, "overlap": round(share, 3)})
    lengths = _lengths(exs, texts, tokenizer, rep, max_length)
    rep.counts = {"examples": len(exs), "held_out": len(held), "invalid": len(rep.invalid),
                  "exact_duplicate_examples": sum(len(g) - 1 for g in dup_groups),
                  "near_duplicate_pairs": len(rep.near_duplicates), "contaminated_held_out": len(rep.contamination),
                  "length_unit": "tokens" if tokenizer is not None else "words",
                  "length_median": statistics.median(lengths) if lengths else 0,
                  "length_max": max(lengths) if lengths else 0, "truncated": len(rep.truncated),
                  "length_outliers": len(rep.length_outliers)}
    return rep


def _lengths(exs: list[Example], texts: list[str], tokenizer, rep: QualityReport, max_length: int) -> list[int]:
    if tokenizer is None:
        lengths = [len(_words(t)) for t in texts]
    else:
        from posttrain.data import render
        from posttrain.data.audit import audit_examples

        pieces = render._render_all(exs, tokenizer, {})  # the exact ids training renders
        lengths = [len(ids) for ids, _ in pieces]
        for ex, (ids, labels) in zip(exs, pieces):
            if len(ids) > max_length:
                rep.truncated.append({"origin": ex.origin, "tokens": len(ids)})
            trained = sum(1 for y in labels if y != -100)
            if trained == 0:
                rep.length_outliers.append({"origin": ex.origin, "tokens": len(ids), "why": "no trained token"})
        audit = audit_examples(exs, tokenizer, max_length=max_length)
        rep.invalid += [{"origin": v.origin, "check": v.check, "message": v.message} for v in audit.violations]
    if len(lengths) >= 4:
        q1, med, q3 = statistics.quantiles(lengths, n=4)
        # Tukey's far-out fences, widened to 4x / 0.25x the median so a second mode is not "outliers"
        lo, hi = min(q1 - 3 * (q3 - q1), med / 4), max(q3 + 3 * (q3 - q1), 4 * med)
        for ex, n in zip(exs, lengths):
            if n > hi or n < lo:
                why = f"above {hi:g} (Q3 + 3 IQR or 4x median)" if n > hi else f"below {lo:g} (Q1 - 3 IQR or median/4)"
                rep.length_outliers.append({"origin": ex.origin, "tokens": n, "why": why})
    return lengths


def format_report(rep: QualityReport, show: int = 5) -> str:
    c = rep.counts
    unit = c.get("length_unit", "tokens")
    lines = [f"examples {c['examples']} (held-out {c['held_out']}); length median {c['length_median']:g} {unit}, "
             f"max {c['length_max']}"]

    def section(title: str, items: list, fmt) -> None:
        lines.append(f"{title}: {len(items)}")
        lines.extend("  " + fmt(x) for x in items[:show])
        if len(items) > show:
            lines.append(f"  ... and {len(items) - show} more (--json lists them all)")

    section("exact duplicate groups", rep.exact_duplicates, lambda g: " = ".join(g))
    section("near duplicates", rep.near_duplicates, lambda d: f"{d['a']} ~ {d['b']} (Jaccard {d['jaccard']})")
    section("held-out examples found in training (13-gram overlap)", rep.contamination,
            lambda d: f"{d['eval']} <- {d['train']} ({d['overlap']:.0%} of its 13-grams)")
    section(f"truncated (longer than data.max_length)", rep.truncated, lambda d: f"{d['origin']}: {d['tokens']} tokens")
    section("length outliers", rep.length_outliers, lambda d: f"{d['origin']}: {d['tokens']} {unit}, {d['why']}")
    section("rejected (format or template audit)", rep.invalid, lambda d: f"{d['origin']}: {d['check']}: {d['message']}")
    return "\n".join(lines)
