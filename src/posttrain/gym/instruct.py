"""Instruction following: arithmetic, string transforms, world facts, formatted answers, length constraints.

A row asks in chat form for one `Fact` (see facts.py) and is verified on its `answer` with the
rule named in `check`. The pretraining corpus states every fact in plain text, and asks
question-and-answer pairs only about train-split facts, so a test question has never been seen
in question form, in chat or in plain text.
"""

from __future__ import annotations

import random

from posttrain.gym.facts import make_fact, sample_rows

QUESTIONS = {
    "add": ("What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."),
    "sub": ("What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}."),
    "mul": ("What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}."),
    "reverse": ("Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse."),
    "upper": ("Write {w} in capital letters.", "Uppercase the word {w}.", "Convert {w} to upper case."),
    "capital": ("What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"),
    "currency": ("What currency is used in {c}?", "Name the currency of {c}."),
    "json": ('Give the capital of {c} as a JSON object with keys "country" and "capital".',
             'Return JSON with the keys "country" and "capital" for {c}.'),
    "count": ("Count from {a} to {b}, separated by commas.", "List the numbers from {a} to {b} as a comma-separated list."),
    "repeat": ("Write the word {w} exactly {k} times, separated by spaces.", "Repeat {w} {k} times."),
}

# how often each kind is drawn; arithmetic is the largest key space, so it gets the most rows
KIND_WEIGHTS = {"add": 3, "sub": 2, "mul": 1, "reverse": 1, "upper": 1, "capital": 2, "currency": 1,
                "json": 1, "count": 1, "repeat": 1}

CHECKS = {"json": "json", "count": "csv", "repeat": "words"}


def render_question(fact, rng: random.Random, template: int | None = None) -> str:
    options = QUESTIONS[fact.kind]
    t = rng.randrange(len(options)) if template is None else template
    return options[t].format(**fact.args)


def draw_kind(rng: random.Random) -> str:
    kinds = list(KIND_WEIGHTS)
    return rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]


def rows(split: str, n: int, seed: int) -> list[dict]:
    def make(rng):
        fact = make_fact(draw_kind(rng), rng)
        q = render_question(fact, rng)
        row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact.answer}],
               "answer": fact.answer, "check": CHECKS.get(fact.kind, "exact"), "kind": fact.kind}
        return fact.key, q, row

    return sample_rows(make, split, n, seed, "instruct")
