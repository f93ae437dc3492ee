"""The regression suite: plain-text (not chat) probes of the skills the base model learned in
pretraining, scored by greedy exact match of a short continuation.

Rows are prompt-completion pairs such as `{"prompt": "7 + 5 =", "completion": " 12"}`. A
prediction is right when the generated text starts with the completion and the next character
ends a word. This is the suite that catches forgetting: SFT changes chat behaviour, and should
leave these scores where the base model had them.
"""

from __future__ import annotations

import random

from posttrain.gym.facts import make_fact, sample_rows

PROBES = {
    "add": ("{a} + {b} =", "{a} plus {b} equals"),
    "sub": ("{a} - {b} =", "{a} minus {b} equals"),
    "mul": ("{a} * {b} =", "{a} times {b} is"),
    "reverse": ("The word {w} reversed is", "{w} written backwards is"),
    "upper": ("The word {w} in capital letters is", "{w} in upper case is"),
    "capital": ("The capital of {c} is",),
    "currency": ("The currency of {c} is the", "People in {c} pay with the"),
    "count": ("Counting from {a} to {b}:", "The numbers from {a} to {b} are"),
}
KINDS = tuple(PROBES)


def rows(split: str, n: int, seed: int) -> list[dict]:
    def make(rng: random.Random):
        fact = make_fact(KINDS[rng.randrange(len(KINDS))], rng)
        prompt = rng.choice(PROBES[fact.kind])
        row = {"prompt": prompt.format(**fact.args), "completion": " " + fact.answer, "kind": fact.kind,
               "check": "prefix"}
        return fact.key, row["prompt"], row

    return sample_rows(make, split, n, seed, "regression")


def prefix_match(generated: str, expected: str) -> bool:
    """`generated` starts with `expected` (both stripped of leading space) and then a word ends."""
    g, e = generated.lstrip(), expected.strip()
    if not g.startswith(e):
        return False
    rest = g[len(e):]
    return not rest or not (rest[0].isalnum() or rest[0] == ",")
