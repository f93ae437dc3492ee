"""The reward-function contract, shared text helpers, and `combine`.

A reward function is any callable

    f(prompts: list, completions: list[str], **dataset_columns) -> list[float | None]

* ``prompts[i]`` is the prompt of row i (a string, or a list of chat messages);
* ``completions[i]`` is the generated text for that row (a list of messages is accepted too:
  the last assistant message's content is scored);
* every other column of the dataset arrives as a keyword argument holding a list aligned with
  the rows (``answer=[...]``, ``tests=[...]``); a function takes what it needs and ignores the rest
  through ``**kwargs``;
* ``None`` in the result means "this reward does not apply to this row" (for example a math
  reward on a row without an ``answer``), which is different from a score of 0.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

RewardFn = Callable[..., list]


def completion_text(completion) -> str:
    """The text to score: a string as is, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        for msg in reversed(completion):
            if isinstance(msg, dict) and msg.get("role", "assistant") == "assistant":
                return str(msg.get("content") or "")
        return ""
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def after_thinking(text: str, tag: str = "think") -> str | None:
    """The part of ``text`` after the last ``</tag>``.

    Returns the whole text when no reasoning block is present, and None when a block was opened
    but never closed: a model that ran out of tokens mid-thought has given no final answer.
    """
    close = f"</{tag}>"
    if close in text:
        return text.rsplit(close, 1)[1]
    if f"<{tag}>" in text:
        return None
    return text


def column(kwargs: dict, name: str, n: int, *, reward: str) -> list | None:
    """Dataset column ``name`` as a list of length n, or None when the dataset lacks it."""
    if name not in kwargs:
        return None
    values = kwargs[name]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{reward}: column {name!r} must be a list aligned with the completions, "
            f"got {type(values).__name__}"
        )
    if len(values) != n:
        raise ValueError(f"{reward}: column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def combine(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> RewardFn:
    """One reward function from several: the weighted sum of the applicable rewards.

    For each row, ``r = sum(w_k * r_k for the k whose r_k is not None)``. Inapplicable rewards
    neither add nor rescale the others (no renormalisation of the weights, so a row scored by
    fewer functions can only reach a smaller maximum). When every function returns None for a
    row the combined result is None, so the row stays "not applicable" for the caller to drop
    or score as it decides. ``weights`` defaults to 1.0 each.
    """
    fns = list(reward_fns)
    if not fns:
        raise ValueError("combine: give at least one reward function")
    ws = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(ws) != len(fns):
        raise ValueError(f"combine: {len(fns)} reward functions but {len(ws)} weights")

    def combined(prompts, completions, **columns):
        total: list = [None] * len(completions)
        for fn, w in zip(fns, ws):
            scores = fn(prompts, completions, **columns)
            name = getattr(fn, "__name__", repr(fn))
            if len(scores) != len(completions):
                raise ValueError(f"reward {name} returned {len(scores)} scores for {len(completions)} completions")
            for i, s in enumerate(scores):
                if s is not None:
                    total[i] = (total[i] or 0.0) + w * float(s)
        return total

    combined.__name__ = "combine(" + ", ".join(getattr(f, "__name__", "fn") for f in fns) + ")"
    return combined


_WS = re.compile(r"\s+")


def squash(text: str) -> str:
    """Lower-case text without whitespace, for string comparison of non-numeric answers."""
    return _WS.sub("", text).lower()
