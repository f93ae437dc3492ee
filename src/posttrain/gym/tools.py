"""Tool-use task: OpenAI-style tool schemas, requests that need a call, and requests that need none.

A call is rendered by the bundled chat template as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
and parsed back by `parse_tool_calls`. Requests that need no tool are ordinary instruct questions
asked while tools are on offer: the right answer is a plain reply and no call at all. Rows carry the
expected call twice: `call` (the gym verifier) and `expected_call` (the `tool_call` reward's column).
"""

from __future__ import annotations

import json
import random
import re

from posttrain.gym.facts import make_fact, sample_rows
from posttrain.gym.reasoning import NAMES
from posttrain.gym.world import countries
from posttrain.gym.instruct import render_question


def _fn(name, description, props, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


TOOLS = {
    "get_weather": _fn("get_weather", "Current weather in a city",
                       {"city": {"type": "string"}}, ["city"]),
    "get_population": _fn("get_population", "Population of a country",
                          {"country": {"type": "string"}}, ["country"]),
    "set_timer": _fn("set_timer", "Start a timer",
                     {"minutes": {"type": "integer"}}, ["minutes"]),
    "convert_currency": _fn("convert_currency", "Convert money between currencies",
                            {"amount": {"type": "number"}, "source": {"type": "string"},
                             "target": {"type": "string"}}, ["amount", "source", "target"]),
    "send_message": _fn("send_message", "Send a short message to a person",
                        {"to": {"type": "string"}, "text": {"type": "string"}}, ["to", "text"]),
}

_REQUESTS = {
    "get_weather": ("What is the weather like in {city} today?", "Is it raining in {city} right now?"),
    "get_population": ("How many people live in {country}?", "What is the population of {country}?"),
    "set_timer": ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer."),
    "convert_currency": ("How much is {amount} {source} in {target}?", "Convert {amount} {source} to {target}."),
    "send_message": ("Send a message to {to} saying {text}.", "Tell {to} {text} by message."),
}

_TEXTS = ("hello", "see you soon", "good night", "thank you", "call me", "I am late", "happy birthday")

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def make_call(name: str, rng: random.Random) -> dict:
    c = rng.choice(countries())
    if name == "get_weather":
        args = {"city": c.capital}
    elif name == "get_population":
        args = {"country": c.name}
    elif name == "set_timer":
        args = {"minutes": rng.randint(1, 90)}
    elif name == "convert_currency":
        d = rng.choice(countries())
        args = {"amount": rng.randint(1, 99), "source": c.currency, "target": d.currency}
    else:
        args = {"to": rng.choice(NAMES), "text": rng.choice(_TEXTS)}
    return {"name": name, "arguments": args}


def make_request(rng: random.Random, *, wide: bool = False) -> dict:
    """One tool request: {'key', 'request', 'call'} with `call` None when no tool fits."""
    if rng.random() < 0.3:
        fact = make_fact(rng.choice(("add", "sub", "capital", "reverse", "upper")), rng, wide=wide)

        q = render_question(fact, rng)
        return {"key": fact.key, "request": q, "call": None, "answer": fact.answer}
    name = rng.choice(sorted(TOOLS))
    call = make_call(name, rng)
    request = rng.choice(_REQUESTS[name]).format(**call["arguments"])
    return {"key": "tool:" + json.dumps(call, sort_keys=True), "request": request, "call": call, "answer": None}


def rows(split: str, n: int, seed: int) -> list[dict]:
    def make(rng):
        req = make_request(rng)
        offered = sorted(rng.sample(sorted(TOOLS), 3) if req["call"] is None else
                         {req["call"]["name"], *rng.sample(sorted(TOOLS), 2)})
        if req["call"] is None:
            reply = {"role": "assistant", "content": req["answer"]}
        else:
            reply = {"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": req["call"]}]}
        row = {"messages": [{"role": "user", "content": req["request"]}, reply],
               "tools": [TOOLS[t] for t in offered], "call": req["call"], "answer": req["answer"],
               "check": "tool_call",
               # the column name posttrain.rewards.tool_call_reward reads (GRPO on gym:tools)
               "expected_call": req["call"]}
        return req["key"], req["request"], row

    return sample_rows(make, split, n, seed, "tools")


def parse_tool_calls(text: str) -> list[dict] | None:
    """Calls found in generated text as [{'name', 'arguments'}]; None if a call block is not valid JSON."""
    calls = []
    for body in TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        calls.append({"name": obj["name"], "arguments": args})
    return calls


def render_call(call: dict) -> str:
    """The text form of a call, identical to the chat template's rendering."""
    return "<tool_call>" + json.dumps({"name": call["name"], "arguments": call["arguments"]}) + "</tool_call>"


# The tool-use recipe on the gym (stage `sft`, from the demo's SFT model; docs/tools.md): gym tool
# conversations and instructions half and half, plus 20% plain text against forgetting.
SFT_OVERRIDES = [
    "data.train=[gym:tools:train,gym:instruct:train]", "data.max_length=256",
    "data.mix.data=gym:regression:train", "data.mix.ratio=0.2",
    "adapter.type=lora", "adapter.r=16", "adapter.alpha=32",
    "train.lr=1e-3", "train.batch_size=16", "train.max_steps=80", "train.schedule=cosine", "train.warmup_steps=5",
    "train.precision=auto",
]
