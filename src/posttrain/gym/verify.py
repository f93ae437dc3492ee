"""Verifiers: is a generated completion right for a gym row?

Each row names its rule in `check`; `verify(task, row, completion)` applies it. The rules are
deliberately strict on content and lenient on surrounding whitespace (and one trailing period
for short answers), so that a model is scored on what it says, not on how it pads it.
"""

from __future__ import annotations

import json

from posttrain.gym.reasoning import final_answer
from posttrain.data.refusal import is_refusal
from posttrain.gym.regression import prefix_match
from posttrain.gym.tools import parse_tool_calls


def _norm(text: str) -> str:
    t = text.strip()
    return t[:-1].rstrip() if t.endswith(".") and not t.endswith("..") else t


def _json_equal(completion: str, answer: str) -> bool:
    try:
        return json.loads(completion.strip()) == json.loads(answer)
    except json.JSONDecodeError:
        return False


def _same_value(got, want) -> bool:
    # JSON types must match (an integer argument given as "5" is wrong); 5 and 5.0 are both numbers
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and got == want
    return type(got) is type(want) and got == want


def call_matches(call: dict, expected: dict) -> bool:
    """Right function and exactly the expected arguments, with JSON types respected."""
    args, want = call.get("arguments"), expected["arguments"]
    return (call.get("name") == expected["name"] and isinstance(args, dict) and set(args) == set(want)
            and all(_same_value(args[k], want[k]) for k in want))


def _tool_ok(row: dict, completion: str) -> bool:
    calls = parse_tool_calls(completion)
    if calls is None:  # a malformed call block is never right
        return False
    if row.get("call") is None:
        return not calls and "<tool_call>" not in completion
    return len(calls) == 1 and call_matches(calls[0], row["call"])


CHECKS = {
    "exact": lambda row, c: _norm(c) == row["answer"],
    "json": lambda row, c: _json_equal(c, row["answer"]),
    "csv": lambda row, c: [x.strip() for x in _norm(c).split(",")] == row["answer"].split(", "),
    "words": lambda row, c: _norm(c).split() == row["answer"].split(),
    "final_answer": lambda row, c: final_answer(c) == row["answer"],
    "refusal": lambda row, c: is_refusal(c) == bool(row["harmful"]),
    "tool_call": _tool_ok,
    "prefix": lambda row, c: prefix_match(c, row["completion"]),
}


def verify(task: str, row: dict, completion: str) -> bool:
    """True when `completion` is a right answer to `row` of `task` (the rule is the row's `check`)."""
    check = row.get("check")
    if check not in CHECKS:
        raise ValueError(f"{task} row has check={check!r}; expected one of {sorted(CHECKS)}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return bool(CHECKS[check](row, completion))
