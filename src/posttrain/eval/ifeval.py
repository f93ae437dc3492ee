"""IFEval-style verifiable instructions (Zhou et al. 2023, "Instruction-Following Evaluation for
Large Language Models"): each prompt carries instructions whose compliance a program can check.

A row: {"prompt": "...", "instructions": [{"type": "length_words", "relation": "at most", "num": 50},
{"type": "no_comma"}]}. Types and their arguments are in `CHECKS` (and docs/eval.md).

Four numbers, as in the paper:
- prompt-level strict: the fraction of prompts whose every instruction is followed;
- instruction-level strict: the fraction of all instructions followed;
- loose variants of both: an instruction counts as followed when any of 8 variants of the
  response passes: the response, with its first line removed, its last line removed, both
  removed, and each of these four with every '*' removed (markdown emphasis). This forgives
  a "Sure, here it is:" opener or a sign-off line, the most common false negatives.

Counting rules (documented because they decide borderline cases): words are maximal runs of
letters/digits/apostrophes (`re.findall(r"[\\w']+")`); sentences are runs of text ended by
., ! or ? followed by whitespace or the end (a trailing fragment counts as one).
"""

from __future__ import annotations

import json
import re
from typing import Callable

RELATIONS = {"at least": lambda a, n: a >= n, "at most": lambda a, n: a <= n,
             "less than": lambda a, n: a < n, "more than": lambda a, n: a > n, "exactly": lambda a, n: a == n}


def count_words(text: str) -> int:
    return len(re.findall(r"[\w']+", text))


def count_sentences(text: str) -> int:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", p)]
    return len(parts)


def _rel(inst: dict, value: int) -> bool:
    rel = inst.get("relation", "at least")
    if rel not in RELATIONS:
        raise ValueError(f"instruction {inst['type']}: relation must be one of {sorted(RELATIONS)}, got {rel!r}")
    return RELATIONS[rel](value, int(inst["num"]))


def _json(text: str, _inst: dict) -> bool:
    t = text.strip()
    m = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", t, re.S)
    if m:
        t = m.group(1)
    try:
        json.loads(t)
        return True
    except json.JSONDecodeError:
        return False


def _kw_count(text: str, kw: str) -> int:
    return len(re.findall(r"\b" + re.escape(kw.lower()) + r"\b", text.lower()))


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "length_words": lambda t, i: _rel(i, count_words(t)),
    "length_sentences": lambda t, i: _rel(i, count_sentences(t)),
    "json_format": _json,
    "keywords_include": lambda t, i: all(_kw_count(t, k) > 0 for k in i["keywords"]),
    "keywords_exclude": lambda t, i: all(_kw_count(t, k) == 0 for k in i["keywords"]),
    "keyword_frequency": lambda t, i: _rel(i, _kw_count(t, i["keyword"])),
    "no_comma": lambda t, i: "," not in t,
    "lowercase": lambda t, i: t == t.lower() and any(c.isalpha() for c in t),
    "uppercase": lambda t, i: t == t.upper() and any(c.isalpha() for c in t),
    "end_phrase": lambda t, i: t.strip().endswith(i["phrase"]),
    "start_phrase": lambda t, i: t.strip().startswith(i["phrase"]),
    "quotation": lambda t, i: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "bullet_points": lambda t, i: len(re.findall(r"^\s*[*-]\s", t, re.M)) == int(i["num"]),
    "title": lambda t, i: re.search(r"<<[^\n]+>>", t) is not None,
    "placeholders": lambda t, i: len(re.findall(r"\[[^\]\n]+\]", t)) >= int(i["num"]),
}

REQUIRED_ARGS = {"length_words": ("num",), "length_sentences": ("num",), "keywords_include": ("keywords",),
                 "keywords_exclude": ("keywords",), "keyword_frequency": ("keyword", "num"),
                 "end_phrase": ("phrase",), "start_phrase": ("phrase",), "bullet_points": ("num",),
                 "placeholders": ("num",)}


def check_instruction(text: str, inst: dict) -> bool:
    kind = inst.get("type")
    if kind not in CHECKS:
        raise ValueError(f"unknown instruction type {kind!r}; known: {', '.join(sorted(CHECKS))}")
    missing = [a for a in REQUIRED_ARGS.get(kind, ()) if a not in inst]
    if missing:
        raise ValueError(f"instruction {kind} needs {', '.join(missing)}")
    return bool(CHECKS[kind](text, inst))


def loose_variants(response: str) -> list[str]:
    """The 8 response variants of IFEval's loose mode (empty ones are dropped)."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    base = [response, *cut]
    variants = base + [v.replace("*", "") for v in base]
    return [v for v in variants if v.strip()]


def follow(response: str, instructions: list[dict]) -> tuple[list[bool], list[bool]]:
    """(strict, loose) compliance per instruction."""
    strict = [check_instruction(response, i) for i in instructions]
    variants = loose_variants(response)
    loose = [any(check_instruction(v, i) for v in variants) for i in instructions]
    return strict, loose
