"""Tool calls in generated text: parsing, validation against the offered tools, and rewards.

Accepted call formats (after any ``<think>...</think>`` block):

* Qwen / Hermes: one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (a final block cut off before its closing tag is accepted);
* a bare JSON object ``{"name": ..., "arguments": {...}}`` or a JSON list of them, optionally
  inside a ```` ```json ```` fence.

In a call object, ``arguments`` may also be spelled ``parameters`` (Llama 3.1) and may be a JSON
string (the OpenAI wire format); ``{"type": "function", "function": {...}}`` wrappers are
unwrapped. Tools are OpenAI-style: ``{"type": "function", "function": {"name", "description",
"parameters": <JSON Schema>}}`` or the inner ``{"name", "parameters"}`` object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from posttrain.rewards.base import after_thinking, column, completion_text
from posttrain.rewards.schema import schema_errors

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


class ToolCallParseError(ValueError):
    """Text that tries to make a tool call but is malformed (bad JSON, no function name...)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def to_tool_call(obj, where: str = "call") -> ToolCall:
    """A ToolCall from a decoded call object; raises ToolCallParseError naming what is missing."""
    if not isinstance(obj, dict):
        raise ToolCallParseError(f"{where}: a call must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError(f"{where}: missing function 'name' (keys: {sorted(obj)})")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args, f"{where} ({name}) arguments string") if args.strip() else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolCallParseError(f"{where} ({name}): arguments must be an object, got {type(args).__name__}")
    return ToolCall(name, args)


def _calls_from_json(value, where: str) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    return [to_tool_call(item, f"{where} item {i}" if isinstance(value, list) else where)
            for i, item in enumerate(items)]


def parse_tool_calls(text, *, think_tag: str = "think") -> list[ToolCall]:
    """The tool calls in generated ``text``, in order; ``[]`` when the text makes no call.

    Raises ToolCallParseError when the text attempts a call but it is malformed: invalid JSON in
    a ``<tool_call>`` block or in a bare JSON answer, a call object without a name, or a reasoning
    block that is never closed.
    """
    text = completion_text(text)
    body = after_thinking(text, think_tag)
    if body is None:
        raise ToolCallParseError(f"<{think_tag}> block is never closed, so no call was completed")
    if "<tool_call>" in body:
        calls = []
        for k, m in enumerate(_BLOCK.finditer(body)):
            inner = m.group(1).strip()
            fenced = _FENCE.fullmatch(inner)
            calls += _calls_from_json(_loads(fenced.group(1) if fenced else inner, f"<tool_call> block {k}"),
                                      f"<tool_call> block {k}")
        return calls
    stripped = body.strip()
    fenced = _FENCE.fullmatch(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if stripped.startswith(("{", "[")):
        return _calls_from_json(_loads(stripped, "JSON call"), "JSON call")
    return []


def _tool_table(tools) -> dict[str, dict]:
    """name -> parameters schema, from an OpenAI-style tools list (or its JSON string)."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    table = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}, got {tool!r}")
        table[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    return table


def validate_call(call: ToolCall, tools) -> tuple[bool, str]:
    """``(True, "")`` when ``call`` names an offered tool with schema-valid arguments.

    Otherwise ``(False, reason)``, e.g. ``"unknown function 'get_wether' (offered: ['get_weather'])"``
    or ``"get_weather: arguments: missing required property 'city'"``.
    """
    table = _tool_table(tools)
    if call.name not in table:
        return False, f"unknown function {call.name!r} (offered: {sorted(table)})"
    if not isinstance(call.arguments, dict):
        return False, f"{call.name}: arguments must be an object, got {type(call.arguments).__name__}"
    errors = schema_errors(call.arguments, table[call.name], "arguments")
    return (False, f"{call.name}: {errors[0]}") if errors else (True, "")


def _expected_calls(expected) -> list[ToolCall]:
    if isinstance(expected, str):
        expected = json.loads(expected)
    return _calls_from_json(expected, "expected_call")


def _row_score(text, tools, expected, has_expected: bool, match_arguments: bool) -> float:
    try:
        calls = parse_tool_calls(text)
    except ToolCallParseError:
        return 0.0
    if has_expected and expected is None:
        return 1.0 if not calls else 0.0  # no offered tool was relevant: the right move is no call
    if not calls or not all(validate_call(c, tools)[0] for c in calls):
        return 0.0
    if not has_expected:
        return 1.0
    want = _expected_calls(expected)
    if sorted(c.name for c in calls) != sorted(c.name for c in want):
        return 0.0
    if match_arguments:
        remaining = [c.to_dict() for c in want]
        for c in calls:
            if c.to_dict() not in remaining:
                return 0.0
            remaining.remove(c.to_dict())
    return 1.0


def tool_call_reward(prompts, completions, *, tools=None, match_arguments: bool = False,
                     **columns) -> list[float | None]:
    """1.0 for a correct tool-use decision, else 0.0; None on rows without a ``tools`` column value.

    Columns: ``tools`` (per row, the offered OpenAI-style tools) and optionally ``expected_call``
    (per row: a call object, a list of them, or None meaning "no offered tool is relevant").

    * Without ``expected_call``: 1.0 when the completion makes at least one call and every call is
      valid (offered name, required arguments present, types as in the schema).
    * ``expected_call`` None: 1.0 exactly when the completion makes no call.
    * ``expected_call`` given: every call valid and the called names equal the expected ones; with
      ``match_arguments=True`` the arguments must also equal the expected ones.
    Malformed call text (see parse_tool_calls) scores 0.0.
    """
    n = len(completions)
    tools_col = column({"tools": tools} if tools is not None else {}, "tools", n, reward="tool_call_reward")
    if tools_col is None:
        return [None] * n
    expected_col = column(columns, "expected_call", n, reward="tool_call_reward")
    has_expected = expected_col is not None
    return [None if t is None else _row_score(c, t, expected_col[i] if has_expected else None,
                                              has_expected, match_arguments)
            for i, (c, t) in enumerate(zip(completions, tools_col))]


def json_schema_reward(prompts, completions, *, schema=None, **_columns) -> list[float | None]:
    """1.0 when the completion (after reasoning; a ```json fence allowed) is JSON valid against the
    row's ``schema`` column (a JSON Schema object or its JSON string), else 0.0; None without one."""
    n = len(completions)
    schemas = column({"schema": schema} if schema is not None else {}, "schema", n, reward="json_schema_reward")
    if schemas is None:
        return [None] * n
    scores: list[float | None] = []
    for completion, s in zip(completions, schemas):
        if s is None:
            scores.append(None)
            continue
        s = json.loads(s) if isinstance(s, str) else s
        body = after_thinking(completion_text(completion)) or ""
        fenced = _FENCE.fullmatch(body.strip())
        try:
            value = json.loads(fenced.group(1) if fenced else body)
        except json.JSONDecodeError:
            scores.append(0.0)
            continue
        scores.append(0.0 if schema_errors(value, s) else 1.0)
    return scores
