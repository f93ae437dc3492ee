"""Final-answer matching for math and numeric tasks.

The final answer is taken from the text after the reasoning block (``</think>``), in this order:
the last ``\\boxed{...}``, a GSM8K ``#### X`` line, an "answer: X" / "answer is X" phrase, and
finally the last number in the text. Numbers compare exactly as fractions, so ``1,234``,
``1234.0``, ``\\frac{3}{4}``, ``3/4`` and ``0.75`` all match their equals.

When the optional ``math-verify`` package is installed (``pip install math-verify``) it decides
equality symbolically (``x^2+2x`` vs ``x(x+2)``); the built-in matcher is the fallback when it is
missing or cannot parse either side.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from posttrain.rewards.base import after_thinking, column, completion_text, squash

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NUM_OR_FRAC = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?")
_FULL_NUMBER = re.compile(rf"(?P<num>{_NUMBER})(?:/(?P<den>{_NUMBER}))?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_PHRASE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*(?P<ans>[^\n]+)", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(?P<ans>[^\n]+)")
_VAR_PREFIX = re.compile(r"^[a-zA-Z]\s*=\s*")
_UNIT_WORDS = re.compile(r"[A-Za-z\s]*")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the generation was cut inside the box


def extract_answer(text: str, *, think_tag: str = "think") -> str | None:
    """The final answer string of a completion, or None when it gives none."""
    text = after_thinking(text, think_tag)
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (_GSM8K, _PHRASE):
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].group("ans").strip()
    numbers = _NUM_OR_FRAC.findall(text)
    return numbers[-1].strip() if numbers else None


def _normalise(s: str) -> str:
    s = _TEXT_CMD.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "{,}", "\\%", "%"):
        s = s.replace(token, "")
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s).strip()
    s = _VAR_PREFIX.sub("", s)
    return s.rstrip(".").strip()


def parse_number(s: str) -> Fraction | None:
    """``s`` as an exact fraction when the whole string is one number, else None.

    Accepts signs, decimals, exponents, thousands separators (``1,234,567``), ``a/b``,
    ``\\frac{a}{b}``, a leading ``x =``, ``$`` and ``%`` signs and ``\\text{}`` wrappers.
    """
    s = _normalise(s).replace(" ", "")
    s = re.sub(r"^\((.*)\)/\((.*)\)$", r"\1/\2", s)
    m = _FULL_NUMBER.fullmatch(s)
    if not m:
        return None
    num = Fraction(m.group("num").replace(",", ""))
    if m.group("den") is None:
        return num
    den = Fraction(m.group("den").replace(",", ""))
    return None if den == 0 else num / den


def _as_value(answer) -> Fraction | str | None:
    if answer is None:
        return None
    if isinstance(answer, bool):
        return str(answer).lower()
    if isinstance(answer, int):
        return Fraction(answer)
    if isinstance(answer, float):
        return Fraction(repr(answer))
    text = str(answer).strip()
    number = parse_number(text)
    if number is not None:
        return number
    # a number with words around it ("42 apples", "5 cm"); not an expression like "x(x+2)"
    found = _NUM_OR_FRAC.findall(_normalise(text))
    if len(found) == 1 and _UNIT_WORDS.fullmatch(_normalise(text).replace(found[0], " ", 1)):
        return parse_number(found[0])
    return squash(_normalise(text))


def answers_match(predicted, gold, *, rel_tol: float = 1e-9) -> bool:
    """Built-in equality of two final answers: numeric when both parse, else normalised text."""
    p, g = _as_value(predicted), _as_value(gold)
    if p is None or g is None:
        return False
    if isinstance(p, Fraction) and isinstance(g, Fraction):
        return p == g or abs(p - g) <= rel_tol * max(1, abs(g))
    return str(p) == str(g)


def _gold_text(gold) -> str:
    """A gold answer given as a full worked solution (GSM8K ``#### 42``) reduces to its answer."""
    if isinstance(gold, str) and ("####" in gold or "\\boxed" in gold):
        return extract_answer(gold) or gold
    return str(gold)


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def _math_verify_match(mv, predicted_text: str, gold) -> bool | None:
    """math-verify's verdict, or None when it cannot parse one side (the caller falls back)."""
    # math-verify's own timeouts use SIGALRM, which only works in the main thread
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    gold_s = _gold_text(gold)
    if not any(c in gold_s for c in "$\\"):
        gold_s = f"${gold_s}$"
    g = mv.parse(gold_s, parsing_timeout=timeout)
    p = mv.parse(predicted_text, parsing_timeout=timeout)
    if not g or not p:
        return None
    return bool(mv.verify(g, p, timeout_seconds=timeout))


def math_answer_reward(prompts, completions, *, answer=None, backend: str = "auto",
                       think_tag: str = "think", **_columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's ``answer`` column, else 0.0.

    Rows whose ``answer`` is None get None (not applicable). ``backend``: ``"auto"`` uses
    math-verify when installed and the built-in matcher otherwise; ``"builtin"`` or
    ``"math_verify"`` force one (the latter raises ImportError when the package is missing).
    A completion that opens ``<think>`` without closing it scores 0.
    """
    n = len(completions)
    gold = column({"answer": answer} if answer is not None else {}, "answer", n, reward="math_answer_reward")
    if gold is None:
        return [None] * n
    if backend not in ("auto", "builtin", "math_verify"):
        raise ValueError(f"math_answer_reward: backend must be auto, builtin or math_verify, got {backend!r}")
    mv = None if backend == "builtin" else _math_verify()
    if backend == "math_verify" and mv is None:
        raise ImportError("math_answer_reward(backend='math_verify') needs `pip install math-verify`")
    scores: list[float | None] = []
    for completion, g in zip(completions, gold):
        if g is None:
            scores.append(None)
            continue
        text = after_thinking(completion_text(completion), think_tag)
        if text is None:
            scores.append(0.0)
            continue
        verdict = _math_verify_match(mv, text, g) if mv is not None else None
        if verdict is None:
            verdict = answers_match(extract_answer(text), _gold_text(g))
        scores.append(1.0 if verdict else 0.0)
    return scores


accuracy = math_answer_reward
