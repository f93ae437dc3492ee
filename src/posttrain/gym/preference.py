"""Preference pairs: the same instruct prompts, with a correct concise answer chosen over a
wrong answer or a verbose (padded) one.

Rows are in the conversational preference format: `prompt` (the user turn), `chosen` and
`rejected` (one assistant turn each), plus the instruct verifier columns `answer` and `check`.
"""

from __future__ import annotations

import random

from posttrain.gym.facts import make_fact, sample_rows
from posttrain.gym.instruct import CHECKS, draw_kind, render_question

_VERBOSE = ("Sure! Let me think about this carefully. The answer is {a}. I hope this helps, and let me know "
            "if you have any other questions!",
            "Great question! After some thought, I believe it is {a}. Feel free to ask me anything else.",
            "Of course. Here is what you asked for: {a}. Please tell me if you need more details.")


def wrong_answer(fact, rng: random.Random) -> str:
    """A plausible wrong answer of the same shape as the right one."""
    ans = fact.answer
    if fact.kind in ("add", "sub", "mul"):
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        return str(max(0, int(ans) + delta)) if int(ans) + delta != int(ans) else str(int(ans) + 1)
    if fact.kind in ("reverse", "upper"):
        w = fact.args["w"]
        return w if fact.kind == "reverse" else w.capitalize()
    if fact.kind == "count":
        nums = ans.split(", ")
        return ", ".join(nums[:-1]) if len(nums) > 2 else ans + ", " + str(int(nums[-1]) + 1)
    if fact.kind == "repeat":
        return " ".join([fact.args["w"]] * (fact.args["k"] + 1))
    if fact.kind == "json":
        return ans.replace('"capital"', '"city"')
    # capital / currency: swap in a word of the same kind from another fact
    for _ in range(20):
        other = make_fact(fact.kind, rng)
        if other.answer != ans:
            return other.answer
    return ans[::-1]


def rows(split: str, n: int, seed: int) -> list[dict]:
    def make(rng):
        fact = make_fact(draw_kind(rng), rng)
        q = render_question(fact, rng)
        if rng.random() < 0.5:
            rejected, why = wrong_answer(fact, rng), "wrong"
        else:
            rejected, why = rng.choice(_VERBOSE).format(a=fact.answer), "verbose"
        row = {"prompt": [{"role": "user", "content": q}],
               "chosen": [{"role": "assistant", "content": fact.answer}],
               "rejected": [{"role": "assistant", "content": rejected}],
               "answer": fact.answer, "check": CHECKS.get(fact.kind, "exact"), "rejected_kind": why}
        return fact.key, q, row

    return sample_rows(make, split, n, seed, "preference")
