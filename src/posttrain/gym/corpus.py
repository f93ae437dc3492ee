"""The plain-text pretraining corpus of the bundled base model.

Documents state the gym's skills the way web text would: lists of equations, sentences about
the generated world, JSON records, counting, worked word problems, FAQ-style "Q: ... A: ..."
pairs and logs of tool calls. No document is a chat: roles, `user`/`assistant` turns and
instructions followed by answers in chat form never appear.

Which facts appear in which form:
- every fact (all splits) is stated declaratively ("7 + 5 = 12", "The capital of X is Y."):
  these are the capabilities, and the regression suite probes them;
- question forms (Q/A pairs, worked problems, tool logs, how-to answers) use train-split keys
  only, so the gym's validation and test questions are never seen as questions.

Each document is framed as `<|im_start|>DOC<|im_end|>\n`. The framing gives the ChatML special
tokens trained embeddings (as real base models such as Qwen2.5 have), so that LoRA can learn to
end a turn. In phase 2 most question forms put the answer in its own segment of the document,
`Q: ...<|im_end|>\n<|im_start|>A: ...`, like the posts of a forum thread: the model learns that a
segment may answer the one before it. No segment has a role, and an answer segment always
starts with a label (`A:`, `Solution:`, `Call:`), so the base model does not answer a chat turn
in the form a verifier accepts. In phase 3 each segment opens with a random author line
(`user`, `assistant`, `guest`, ...), so role words are known words (see docs/gym.md).
"""

from __future__ import annotations

import random

from posttrain.gym import reasoning, refusal, tools
from posttrain.gym.chat_template import tool_listing
from posttrain.gym.facts import make_fact, split_of
from posttrain.gym.instruct import render_question
from posttrain.gym.world import countries

DOC_START, DOC_END = "<|im_start|>", "<|im_end|>"
SEGMENT = DOC_END + "\n" + DOC_START  # a new segment (post) of the same document

_DECLARE = {
    "add": ("{a} + {b} = {ans}", "The sum of {a} and {b} is {ans}.", "{a} plus {b} equals {ans}."),
    "sub": ("{a} - {b} = {ans}", "{a} minus {b} equals {ans}.", "Taking {b} from {a} leaves {ans}."),
    "mul": ("{a} * {b} = {ans}", "{a} times {b} is {ans}.", "The product of {a} and {b} is {ans}."),
    "reverse": ("The word {w} reversed is {ans}.", "{w} written backwards is {ans}.", "reverse({w}) = {ans}"),
    "upper": ("The word {w} in capital letters is {ans}.", "{w} in upper case is {ans}.", "upper({w}) = {ans}"),
    "capital": ("The capital of {c} is {ans}.", "{ans} is the capital city of {c}.",
                "Travellers to {c} usually arrive in {ans}, the capital."),
    "currency": ("The currency of {c} is the {ans}.", "People in {c} pay with the {ans}."),
    "json": ("{ans}",),
    "count": ("Counting from {a} to {b}: {ans}.", "The numbers from {a} to {b} are {ans}."),
    "repeat": ("The word {w} {k} times: {ans}", "{w} repeated {k} times is {ans}."),
}

_TOPICS = {  # document kind -> (fact kinds it mixes, weight in the corpus)
    "arithmetic": (("add", "sub", "mul"), 5.0),
    "words": (("reverse", "upper", "repeat"), 2.5),
    "geography": (("capital", "currency"), 2.5),
    "records": (("json",), 0.8),
    "counting": (("count",), 0.8),
}


def declare(fact, rng: random.Random) -> str:
    return rng.choice(_DECLARE[fact.kind]).format(ans=fact.answer, **fact.args)


def _sep(threads: bool, rng: random.Random) -> str:
    """Between a question and its answer: a line break, or (phase 2) a new segment of a thread."""
    return SEGMENT if threads and rng.random() < 0.6 else "\n"


def _fact_doc(kinds, rng: random.Random, wide: bool, threads: bool) -> str:
    lines = []
    qa = rng.random() < 0.35  # a third of fact documents are FAQ pages
    for _ in range(rng.randint(3, 8)):
        fact = make_fact(rng.choice(kinds), rng, wide=wide)
        if qa and split_of(fact.key) == "train":
            lines.append(f"Q: {render_question(fact, rng)}{_sep(threads, rng)}A: {fact.answer}")
        else:
            lines.append(declare(fact, rng))
    return "\n".join(lines)


def _country_profile(rng: random.Random) -> str:
    c = rng.choice(countries())
    parts = [f"{c.name} is a country.", f"Its capital is {c.capital}.", f"The currency of {c.name} is the {c.currency}.",
             f"Many people in {c.capital} work in trade."]
    return " ".join(parts[:rng.randint(2, 4)])


def _train_only(make, rng: random.Random):
    while True:
        item = make(rng)
        if split_of(item["key"]) == "train":
            return item


def _problem_doc(rng: random.Random, wide: bool, threads: bool) -> str:
    pb = _train_only(lambda r: reasoning.make_problem(r, wide=wide), rng)
    return f"Problem: {pb['question']}{_sep(threads, rng)}Solution: {pb['solution']}"


def _tool_log(rng: random.Random, wide: bool, threads: bool) -> str:
    """An API log: the tool listing (as the chat template shows it), then requests and their calls."""
    names = set(rng.sample(sorted(tools.TOOLS), 3))
    lines = []
    for _ in range(rng.randint(1, 3)):
        req = _train_only(lambda r: tools.make_request(r, wide=wide), rng)
        if req["call"] is not None:
            names.add(req["call"]["name"])
            lines.append(f"Request: {req['request']}{_sep(threads, rng)}Call: {tools.render_call(req['call'])}")
    if not lines:
        return _country_profile(rng)
    return tool_listing([tools.TOOLS[n] for n in sorted(names)]) + "\n" + "\n".join(lines)


def _howto_doc(rng: random.Random, threads: bool) -> str:
    req = _train_only(lambda r: refusal.make_request(r, harmful=False), rng)
    return f"Q: {req['request']}{_sep(threads, rng)}A: {req['reply']}"


def documents(seed: int = 0, *, phase: int = 2):
    """An endless, deterministic stream of plain-text documents (without the outer framing).

    Phase 1 (`phase=1`) has arithmetic over 0-99 and FAQ answers on the line after their
    question; phase 2 has the gym's arithmetic ranges and puts most answers in their own
    segment (see the module docstring).
    """
    wide, threads = phase == 1, phase >= 2
    rng = random.Random(f"corpus:{seed}")
    makers = [(lambda r, ks=kinds: _fact_doc(ks, r, wide, threads), w) for kinds, w in _TOPICS.values()]
    makers += [(_country_profile, 0.7), (lambda r: _problem_doc(r, wide, threads), 1.0),
               (lambda r: _tool_log(r, wide, threads), 0.8), (lambda r: _howto_doc(r, threads), 0.6)]
    fns, weights = zip(*makers)
    while True:
        doc = rng.choices(fns, weights=weights)[0](rng)
        if phase >= 3 and SEGMENT in doc:
            doc = _with_authors(doc, rng)
        yield doc


# Phase 3: each segment of a thread opens with its author's name on its own line, drawn at random
# (so "assistant" asks as often as it answers). Role words are ordinary words of the corpus then,
# instead of byte fragments never seen in pretraining that derail the model after `<|im_start|>`.
AUTHORS = ("user", "assistant", "system", "tool", "guest", "admin", "reader", "moderator", "Mira", "Tom")


def _with_authors(doc: str, rng: random.Random) -> str:
    parts = doc.split(SEGMENT)
    return SEGMENT.join(f"{rng.choice(AUTHORS)}\n{p}" for p in parts)


def framed(doc: str) -> str:
    return f"{DOC_START}{doc}{DOC_END}\n"
