"""Reasoning task: multi-step word problems with a worked solution and a checkable final answer.

Each step is one of the arithmetic skills of the bundled model (sums of numbers up to 15,
differences below 21), so a correct chain of steps is within its reach; getting every step of a 2-3 step chain
right is what SFT alone does not make reliable, and what RL on the verifier improves.
"""

from __future__ import annotations

import random
import re

from posttrain.gym.facts import ADD_MAX, SUB_MAX, sample_rows

NAMES = ("Mira", "Tom", "Ana", "Bo", "Lena", "Otto", "Ida", "Finn", "Nora", "Eli", "Sara", "Leo",
         "Maya", "Jon", "Ruth", "Ivan", "Zoe", "Paul", "Tess", "Omar")
ITEMS = ("apples", "pens", "cards", "shells", "coins", "books", "stamps", "marbles", "eggs", "beads")

# (question clause, solution clause, sign); {n} is the amount, {o} another person
_STEPS = (
    ("{p} buys {n} more", "After buying {n} more, {p} has {x} + {n} = {y}.", 1),
    ("{p} finds {n} more", "After finding {n} more, {p} has {x} + {n} = {y}.", 1),
    ("{o} gives {p} {n} more", "After getting {n} from {o}, {p} has {x} + {n} = {y}.", 1),
    ("{p} gives {n} to {o}", "After giving {n} to {o}, {p} has {x} - {n} = {y}.", -1),
    ("{p} loses {n}", "After losing {n}, {p} has {x} - {n} = {y}.", -1),
    ("{p} sells {n}", "After selling {n}, {p} has {x} - {n} = {y}.", -1),
)

ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def make_problem(rng: random.Random, *, wide: bool = False) -> dict:
    """One problem: {'key', 'question', 'solution', 'answer'}.

    Every step stays inside the arithmetic facts (`facts.ADD_MAX`, `facts.SUB_MAX`), so each step
    is a skill the base model has; `wide` is the 0-99 range of the first pretraining phase.
    """
    top, add_max = (99, 99) if wide else (SUB_MAX, ADD_MAX)
    p, o = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x = rng.randint(5, 60) if wide else rng.randint(2, 12)
    q = [f"{p} has {x} {item}."]
    sol = [f"{p} starts with {x} {item}."]
    key = [p, o, item, str(x)]
    for i in range(rng.choice((2, 3))):
        clause, worked, sign = rng.choice(_STEPS)
        if sign > 0 and (x >= top or x > add_max):  # no room to add: take away instead
            clause, worked, sign = _STEPS[3]
        elif sign < 0 and x <= 0:  # nothing left to take away: add instead
            clause, worked, sign = _STEPS[0]
        n = rng.randint(1, min(add_max, top - x)) if sign > 0 else rng.randint(1, x)
        y = x + sign * n
        lead = "Then " if i else ""
        text = clause.format(p=p, o=o, n=n)
        q.append(lead + text + ".")
        sol.append(worked.format(p=p, o=o, n=n, x=x, y=y))
        key.append(f"{sign * n}")
        x = y
    q.append(f"How many {item} does {p} have now?")
    sol.append(f"Answer: {x}")
    question = " ".join(s[0].upper() + s[1:] for s in q)
    return {"key": "reason:" + ":".join(key), "question": question, "solution": " ".join(sol[:-1]) + "\n" + sol[-1],
            "answer": str(x)}


def rows(split: str, n: int, seed: int) -> list[dict]:
    def make(rng):
        pb = make_problem(rng)
        row = {"messages": [{"role": "user", "content": pb["question"]},
                            {"role": "assistant", "content": pb["solution"]}],
               "answer": pb["answer"], "check": "final_answer"}
        return pb["key"], pb["key"], row

    return sample_rows(make, split, n, seed, "reasoning")


def final_answer(completion: str) -> str | None:
    """The number after the last 'Answer:' in a completion, or None."""
    found = ANSWER_RE.findall(completion)
    return found[-1] if found else None
