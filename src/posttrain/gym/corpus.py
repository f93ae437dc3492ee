"""The plain-text pretraining corpus of the bundled base model.

Documents state the gym's skills the way web text would: lists of equations, sentences about
the generated world, JSON records, counting, FAQ pages of "Q: ...\\nA: ..." pairs, worked word
problems and logs of tool calls. No document is a chat: role words (`user`, `assistant`) never
head a turn, and no answer is ever written the way a chat answer is.

Every fact of every split is stated both declaratively ("11 + 15 = 26", "The capital of X is Y.")
and as FAQ pairs whose questions are rendered with the instruct task's own question templates.
This is what a base model is: it knows the facts and answers questions in plain text. The gym's
held-out examples are held-out *instruction* examples; answering them through the chat template
is the behaviour SFT adds. Word problems, tool logs and how-to answers (the tasks whose held-out
rows are whole new prompts rather than one fact) use train-split keys only.

Each document is framed as `<|im_start|>DOC<|im_end|>\\n`, so the ChatML special tokens have
trained embeddings (as in real base models such as Qwen2.5) and `<|im_end|>` means "the text
ends here"; a fifth of FAQ documents hold a single pair, so a document often ends right after
an answer, which is what LoRA has to learn to do after the assistant's answer.

Segments (`threads=True`, the last pretraining run): 60% of question-answer pairs put the answer,
always labelled (`A:`, `Solution:`, `Call:`), in its own segment, `...?<|im_end|>\n<|im_start|>A: 26`,
like a reply in a forum thread. Without them the model learns that nothing before an
`<|im_start|>` matters, and LoRA SFT cannot learn in 150 steps to read the user turn across the
chat boundary (measured: 0.36 held-out accuracy, right shape, wrong content). No segment has a
role header, and the label keeps the base model from answering a chat turn in a form the
verifiers accept (held-out chat accuracy 0.00).
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
    "add": ("{a} + {b} = {ans}", "{a} plus {b} equals {ans}.", "The sum of {a} and {b} is {ans}."),
    "sub": ("{a} - {b} = {ans}", "{a} minus {b} equals {ans}.", "Taking {b} from {a} leaves {ans}."),
    "mul": ("{a} * {b} = {ans}", "{a} times {b} is {ans}.", "The product of {a} and {b} is {ans}."),
    "reverse": ("The word {w} reversed is {ans}.", "{w} written backwards is {ans}.", "reverse({w}) = {ans}"),
    "upper": ("The word {w} in capital letters is {ans}.", "{w} in upper case is {ans}.", "upper({w}) = {ans}"),
    "capital": ("The capital of {c} is {ans}.", "{ans} is the capital city of {c}."),
    "currency": ("The currency of {c} is the {ans}.", "People in {c} pay with the {ans}."),
    "json": ("{ans}",),
    "count": ("Counting from {a} to {b}: {ans}.", "The numbers from {a} to {b} are {ans}."),
    "repeat": ("The word {w} {k} times: {ans}", "{w} repeated {k} times is {ans}."),
}

# Weight of each fact kind among fact lines: roughly its number of facts that must be memorised
# (sums 256, differences 231, products 64, 100 countries, ~115 words); counting, repetition and
# capital letters are rules and need fewer lines.
FACT_WEIGHTS = {"add": 4.0, "sub": 3.5, "mul": 1.5, "reverse": 2.5, "upper": 1.2, "capital": 2.0,
                "currency": 2.0, "json": 1.0, "count": 1.0, "repeat": 1.0}


def declare(fact, rng: random.Random) -> str:
    return rng.choice(_DECLARE[fact.kind]).format(ans=fact.answer, **fact.args)


def faq(fact, rng: random.Random, threads: bool = False) -> str:
    """A question (the instruct task's wording) and its answer on the next line; quiz pages have no labels.

    With `threads`, 60% of pairs put the labelled answer in its own segment, like a forum reply.
    """
    q = render_question(fact, rng)
    if threads and rng.random() < 0.6:
        return f"{q if rng.random() < 0.5 else 'Q: ' + q}{SEGMENT}A: {fact.answer}"
    return f"Q: {q}\nA: {fact.answer}" if rng.random() < 0.7 else f"{q}\n{fact.answer}"


def _sep(threads: bool, rng: random.Random) -> str:
    return SEGMENT if threads and rng.random() < 0.6 else "\n"


def _kind(rng: random.Random) -> str:
    return rng.choices(list(FACT_WEIGHTS), weights=list(FACT_WEIGHTS.values()))[0]


def _fact_doc(rng: random.Random, threads: bool) -> str:
    """A page about one kind of fact: statements, FAQ pairs, or each fact stated then asked."""
    kind, style = _kind(rng), rng.random()
    if style < 0.2:  # a single FAQ pair: the document ends right after the answer
        return faq(make_fact(kind, rng), rng, threads)
    lines = []
    for _ in range(rng.randint(3, 8)):
        fact = make_fact(kind, rng)
        if style < 0.55:
            lines.append(faq(fact, rng, threads))
        elif style < 0.8:
            lines.append(declare(fact, rng))
        else:
            lines.append(f"{declare(fact, rng)}\n{faq(fact, rng, threads)}")
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


def _problem_doc(rng: random.Random, threads: bool) -> str:
    pb = _train_only(reasoning.make_problem, rng)
    return f"Problem: {pb['question']}{_sep(threads, rng)}Solution: {pb['solution']}"


def _tool_log(rng: random.Random, threads: bool) -> str:
    """An API log: the tool listing (as the chat template shows it), then requests and their calls."""
    names = set(rng.sample(sorted(tools.TOOLS), 3))
    lines = []
    for _ in range(rng.randint(1, 3)):
        req = _train_only(tools.make_request, rng)
        if req["call"] is not None:
            names.add(req["call"]["name"])
            lines.append(f"Request: {req['request']}{_sep(threads, rng)}Call: {tools.render_call(req['call'])}")
    if not lines:
        return _country_profile(rng)
    return tool_listing([tools.TOOLS[n] for n in sorted(names)]) + "\n" + "\n".join(lines)


def _howto_doc(rng: random.Random, threads: bool) -> str:
    req = _train_only(lambda r: refusal.make_request(r, harmful=False), rng)
    return f"Q: {req['request']}{_sep(threads, rng)}A: {req['reply']}"


def documents(seed: int = 0, *, threads: bool = False):
    """An endless, deterministic stream of plain-text documents (without the outer framing).

    `threads=True` (the last pretraining run) puts many answers in their own segment.
    """
    rng = random.Random(f"corpus:{seed}")
    makers = [(_fact_doc, 8.0), (lambda r, _: _country_profile(r), 0.4), (_problem_doc, 0.6), (_tool_log, 0.5),
              (_howto_doc, 0.4)]
    fns, weights = zip(*makers)
    while True:
        yield rng.choices(fns, weights=weights)[0](rng, threads)


def framed(doc: str) -> str:
    return f"{DOC_START}{doc}{DOC_END}\n"
