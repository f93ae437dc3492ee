"""Atomic skills of the generated world, and the split every example belongs to.

A `Fact` is one checkable piece of knowledge or computation ("7 + 5 = 12", "the capital of
Goumos is Pomsom", "stone reversed is enots"). The pretraining corpus states facts in plain
text; the gym's tasks ask for them in chat form. A fact's split (train / validation / test) is a
hash of its key, so every task that reuses a fact puts it in the same split, and the splits are
disjoint by construction, whatever the seed or the number of rows asked for.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from posttrain.gym.world import WORDS, countries

SPLITS = ("train", "validation", "test")
_SPLIT_EDGES = (80, 90)  # 80% train, 10% validation, 10% test


def split_of(key: str) -> str:
    """Deterministic split of an example key: sha256 bucket 0-79 train, 80-89 validation, 90-99 test."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < _SPLIT_EDGES[0] else "validation" if h < _SPLIT_EDGES[1] else "test"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose from {SPLITS}")


@dataclass(frozen=True)
class Fact:
    kind: str
    key: str
    args: dict
    answer: str


FACT_KINDS = ("add", "sub", "mul", "reverse", "upper", "capital", "currency", "json", "count", "repeat")


# Arithmetic ranges of the gym. The first pretraining phase also saw sums over 0-99 (`wide`),
# which a 2M-parameter model did not learn in 750 steps; see docs/gym.md.
ADD_MAX, SUB_MAX, MUL_MAX = 15, 20, 9


def make_fact(kind: str, rng: random.Random, *, wide: bool = False) -> Fact:
    """Draw one fact of `kind` uniformly from its (finite) key space."""
    if kind == "add":
        hi = 99 if wide else ADD_MAX
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return Fact(kind, f"add:{a}:{b}", {"a": a, "b": b}, str(a + b))
    if kind == "sub":
        a = rng.randint(0, 99 if wide else SUB_MAX)
        b = rng.randint(0, a)
        return Fact(kind, f"sub:{a}:{b}", {"a": a, "b": b}, str(a - b))
    if kind == "mul":
        hi = 12 if wide else MUL_MAX
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        return Fact(kind, f"mul:{a}:{b}", {"a": a, "b": b}, str(a * b))
    if kind in ("reverse", "upper"):
        w = rng.choice(WORDS)
        return Fact(kind, f"{kind}:{w}", {"w": w}, w[::-1] if kind == "reverse" else w.upper())
    if kind in ("capital", "currency", "json"):
        c = rng.choice(countries())
        if kind == "capital":
            return Fact(kind, f"capital:{c.name}", {"c": c.name}, c.capital)
        if kind == "currency":
            return Fact(kind, f"currency:{c.name}", {"c": c.name}, c.currency)
        # the JSON record is the capital fact in another format, so it shares the capital's split
        return Fact(kind, f"capital:{c.name}", {"c": c.name},
                    '{"country": "%s", "capital": "%s"}' % (c.name, c.capital))
    if kind == "count":
        a = rng.randint(1, 60)
        b = a + rng.randint(2, 5)
        return Fact(kind, f"count:{a}:{b}", {"a": a, "b": b}, ", ".join(str(i) for i in range(a, b + 1)))
    if kind == "repeat":
        w, k = rng.choice(WORDS), rng.randint(2, 5)
        return Fact(kind, f"repeat:{w}:{k}", {"w": w, "k": k}, " ".join([w] * k))
    raise ValueError(f"unknown fact kind '{kind}'; choose from {FACT_KINDS}")


def sample_rows(make_row, split: str, n: int, seed: int, salt: str, *, max_tries: int = 200):
    """Draw `n` distinct rows whose key hashes into `split`.

    `make_row(rng) -> (key, dedup, row)`: `key` decides the split, `dedup` identifies the row.
    The RNG stream depends on (salt, split, seed) only, so the same arguments give the same rows.
    """
    check_split(split)
    rng = random.Random(f"{salt}:{split}:{seed}")
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > max_tries * max(n, 10):
            raise ValueError(f"task '{salt}' has only {len(rows)} distinct {split} rows; asked for {n}")
        key, dedup, row = make_row(rng)
        if split_of(key) != split or dedup in seen:
            continue
        seen.add(dedup)
        rows.append(row)
    return rows
