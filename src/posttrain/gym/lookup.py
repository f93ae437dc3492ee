"""Lookup task (multi-turn, with tools): a question about the asker's country, answered in three or four moves.

Every country of the gym world has a few counts (lakes, towers, bridges) that appear nowhere in
the pretraining corpus. The asker lives in one of them (the row's `country`, never stated in the
conversation), and only the `lookup` tool returns its counts, as an account or profile tool
would. A question needs one or two counts and one sum or difference, which the `calculator` tool
computes. The worked trace, one call per turn, is

    user       If we built 4 more towers, how many towers would we have?
    assistant  <tool_call>{"name": "lookup", "arguments": {"item": "towers"}}</tool_call>
    tool       3
    assistant  <tool_call>{"name": "calculator", "arguments": {"expression": "3 + 4"}}</tool_call>
    tool       3 + 4 = 7
    assistant  Answer: 7

so a model without the tool cannot do better than guessing. Rows are SFT conversations (the
trace above, with `tools`) plus `country`, `answer` and `check`; `LookupEnv` is the environment
that plays the same episode live (see posttrain.rollout.episodes for the protocol).

Earlier versions named the country in the question and had the model copy it into the call
(`lookup(country)`, returning first the JSON record of all three counts, then `lookup(country,
item)`): after SFT the 1.9M-parameter model wrote a memorized name instead of the question's
("Katheth" for "Kimia") in most episodes, held-out success 0.04-0.10, and GRPO had almost no
successful episodes to learn from (docs/rl.md).
"""

from __future__ import annotations

import ast
import operator
import random
import re
from functools import lru_cache

from posttrain.gym.facts import sample_rows
from posttrain.gym.reasoning import final_answer
from posttrain.gym.world import countries

LOOKUP_SEED = 20261206  # not the world's seed: these counts are never stated in the corpus
FIELDS = ("lakes", "towers", "bridges")
MAX_TURNS = 4  # two lookups, one calculation, the answer


def _fn(name, description, props, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


TOOLS = [
    _fn("lookup", "How many lakes, towers or bridges our country has",
        {"item": {"type": "string", "enum": list(FIELDS)}}, ["item"]),
    _fn("calculator", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}, ["expression"]),
]


@lru_cache(maxsize=1)
def records() -> dict[str, dict]:
    """country name -> {"country", "lakes", "towers", "bridges"} (counts 2-15), deterministic."""
    rng = random.Random(LOOKUP_SEED)
    return {c.name: {"country": c.name, **{f: rng.randint(2, 15) for f in FIELDS}} for c in countries()}


# ------------------------------------------------------------------ tools


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def calculate(expression: str) -> str:
    """Numbers, + - * /, unary minus and parentheses, evaluated by walking the syntax tree (no eval):
    '3 + 4' -> '7', '7 / 2' -> '3.5'. Raises ValueError on anything else."""
    if not isinstance(expression, str) or len(expression) > 100:
        raise ValueError("expression must be a string of at most 100 characters")
    try:
        value = _eval(ast.parse(expression, mode="eval").body)
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    return str(int(value)) if float(value).is_integer() else str(round(value, 6))


def lookup(country: str, item: str) -> str:
    """How many `item`s (lakes, towers, bridges) the country has, as text; ValueError for a country the
    world does not have or another item."""
    rec = records().get(str(country).strip())
    if rec is None:
        raise ValueError(f"unknown country {country!r}")
    if item not in FIELDS:
        raise ValueError(f"unknown item {item!r} (items: {', '.join(FIELDS)})")
    return str(rec[item])


# the calculator's result repeats the expression ("11 - 10 = 1"): the answer is then the number after "="
_RUN = {"lookup": lambda a, country: lookup(country, a["item"]),
        "calculator": lambda a, country: f"{a['expression']} = {calculate(a['expression'])}"}


def run_tool(name: str, arguments: dict, country: str) -> tuple[str, bool]:
    """(result text, is_error) of one call by someone living in `country`; errors come back as text
    for the model to read."""
    if name not in _RUN:
        return f"error: unknown tool {name!r} (tools: {', '.join(_RUN)})", True
    try:
        return _RUN[name](arguments, country), False
    except KeyError as e:
        return f"error: {name} needs the argument {e.args[0]!r}", True
    except ValueError as e:
        return f"error: {e}", True


_EXPRESSION = re.compile(r"\s*(\d+)\s*([+-])\s*(\d+)\s*$")


def expression_parts(expression) -> tuple[str, str, str] | None:
    """'12 - 9' -> ('12', '-', '9'); None for anything but `number +/- number`."""
    m = _EXPRESSION.match(str(expression))
    return m.groups() if m else None


def parts_right(expression, gold: str) -> int:
    """How many of the three parts of `gold` (first operand, operator, second operand) `expression`
    has in place: 0-3. A sum's operands count in either order (both give the answer)."""
    got, want = expression_parts(expression), expression_parts(gold)
    if got is None or want is None:
        return 0
    if want[1] == "+" and got[1] == "+" and (got[2], got[0]) == (want[0], want[2]):
        return 3
    return sum(a == b for a, b in zip(got, want))


class LookupEnv:
    """One lookup episode for the row's `country`: tool calls are executed, and a turn without a call
    is the final answer, rewarded 1.0 when its `Answer: N` is right (0.0 otherwise).

    Two optional per-turn rewards (shaping; the final answer stays the measure of success):
    `lookup_credit` for each lookup of an item the question names, once per item, and
    `expression_credit` × (parts right) / 3 for the episode's first calculator call, whose parts are
    the worked trace's expression's first operand, operator and second operand (`parts_right`): the
    looked-up count, the question's sign, the question's number or the second count. The episode
    reward is the sum over turns.
    """

    tools = TOOLS

    def __init__(self, lookup_credit: float = 0.0, expression_credit: float = 0.0):
        self.answer: str | None = None
        self.country = ""
        self.lookup_credit, self.expression_credit = lookup_credit, expression_credit
        self.named: set[str] = set()
        self.gold_expression: str | None = None  # None once the first calculator call is rewarded

    def reset(self, row: dict) -> list[dict]:
        self.answer, self.country = row["answer"], row["country"]
        msgs = row["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant") if len(msgs) > 1 else len(msgs)
        self.named = {f for f in FIELDS if f in msgs[0]["content"]}
        self.gold_expression = next((c["function"]["arguments"]["expression"] for m in msgs
                                     for c in m.get("tool_calls") or [] if c["function"]["name"] == "calculator"), None)
        return [dict(m) for m in msgs[:first]]

    def step(self, messages: list[dict], assistant_turn: dict) -> tuple[list[dict], float, bool]:
        calls = assistant_turn.get("tool_calls") or []
        if not calls:
            return [], float(final_answer(assistant_turn.get("content") or "") == self.answer), True
        out, reward = [], 0.0
        for c in calls:
            fn = c.get("function", c)
            args = fn.get("arguments") or {}
            text, err = run_tool(fn["name"], args, self.country)
            out.append({"role": "tool", "content": text, **({"error": True} if err else {})})
            if fn["name"] == "lookup" and args.get("item") in self.named:
                self.named.discard(args["item"])
                reward += self.lookup_credit
            if fn["name"] == "calculator" and self.gold_expression is not None:
                reward += self.expression_credit * parts_right(args.get("expression"), self.gold_expression) / 3
                self.gold_expression = None
        return out, reward, False


# ------------------------------------------------------------------ questions and traces


_ONE = (  # (question, sign): one lookup, then value +- n
    ("If we built {n} more {f}, how many {f} would we have?", 1),
    ("We plan {n} new {f}. How many {f} will we have then?", 1),
    ("If we lost {n} of our {f}, how many {f} would be left?", -1),
    ("We close {n} of our {f}. How many {f} stay open?", -1),
)
_TWO = (  # two lookups, then the sum or the difference
    ("How many {f} and {g} do we have together?", 1),
    ("How many more {f} than {g} do we have?", -1),
)


def _call(name: str, **arguments) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def make_question(rng: random.Random) -> dict:
    """One question: {'key', 'country', 'question', 'messages' (the worked trace), 'answer'}."""
    country = rng.choice(countries()).name
    rec = records()[country]
    if rng.random() < 0.5:
        f = rng.choice(FIELDS)
        template, sign = rng.choice(_ONE)
        n = rng.randint(1, 9) if sign > 0 else rng.randint(1, rec[f] - 1)
        looked, expr, key = [f], f"{rec[f]} {'+' if sign > 0 else '-'} {n}", f"lookup:{country}:{f}:{sign * n}"
        question = template.format(n=n, f=f)
    else:
        f, g = rng.sample(FIELDS, 2)
        template, sign = rng.choice(_TWO)
        if sign < 0 and rec[f] <= rec[g]:
            if rec[f] == rec[g]:
                template, sign = _TWO[0]
            else:
                f, g = g, f
        looked, expr, key = [f, g], f"{rec[f]} {'+' if sign > 0 else '-'} {rec[g]}", f"lookup:{country}:{f}:{g}:{sign}"
        question = template.format(f=f, g=g)
    answer = calculate(expr)
    msgs = [{"role": "user", "content": question}]
    for item in looked:
        msgs += [_call("lookup", item=item), {"role": "tool", "content": lookup(country, item)}]
    msgs += [_call("calculator", expression=expr), {"role": "tool", "content": f"{expr} = {answer}"},
             {"role": "assistant", "content": f"Answer: {answer}"}]
    return {"key": key, "country": country, "question": question, "messages": msgs, "answer": answer}


def rows(split: str, n: int, seed: int) -> list[dict]:
    """SFT rows: the worked trace as `messages`, the offered `tools`, the asker's `country` (the
    environment's state), and `answer` / `check` for the final turn (`final_answer`: the number
    after `Answer:`)."""
    def make(rng):
        q = make_question(rng)
        row = {"messages": q["messages"], "tools": TOOLS, "country": q["country"], "answer": q["answer"],
               "check": "final_answer"}
        return q["key"], q["key"], row

    return sample_rows(make, split, n, seed, "lookup")
