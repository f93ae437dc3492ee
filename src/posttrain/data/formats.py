"""Validate rows and turn them into `Example`s of one of three kinds.

=================  =========================================================================
kind               fields of the row
=================  =========================================================================
text               ``text``: a non-empty string (continued pretraining; loss on every token)
prompt_completion  ``prompt``, ``completion``: strings, or lists of messages (conversational
                   prompt-completion); loss on the completion only
conversational     ``messages``: a list of {role, content}; roles system/user/assistant/tool;
                   assistant messages may carry ``tool_calls``; rows may carry ``tools``.
                   ShareGPT rows (``conversations`` of {from, value}) are converted to this.
=================  =========================================================================

Every error is a `DataError` whose message starts with the row's origin and names the field:
``train.jsonl line 17: messages[2].role must be one of system/user/assistant/tool, got 'bot'``.

A conversation's turns must also make sense as a whole; these rows are rejected, not skipped,
because each one points at a conversion bug that would otherwise train silently on the wrong thing:

- a system message anywhere but first (``messages[3] is a system message after the conversation started``);
- a tool message that answers no tool call (``messages[1] is a tool result with no tool call before it``);
- a conversation that ends on a user or tool turn (nothing after it is trained on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from posttrain.data.sources import DataError, Record

KINDS = ("text", "prompt_completion", "conversational")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names seen in published data sets, mapped to chat roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bing": "assistant", "bard": "assistant", "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool", "ipython": "tool",
}


@dataclass
class Example:
    kind: str
    origin: str
    text: Optional[str] = None
    prompt: Any = None  # str, or list of messages
    completion: Any = None  # str, or list of messages
    messages: Optional[list[dict]] = None
    tools: Optional[list[dict]] = None


def detect_format(data: dict) -> str:
    """The kind a row's fields say it is; `fmt="auto"` uses this (ShareGPT counts as conversational)."""
    if "messages" in data or "conversations" in data:
        return "conversational"
    if "prompt" in data or "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return ""


def to_example(record: Record, fmt: str = "auto") -> Example:
    """Validate one record and build its `Example`; raises `DataError` naming origin and field."""
    data, where = record.data, record.origin
    kind = detect_format(data) if fmt == "auto" else fmt
    if kind not in KINDS:
        if fmt != "auto":
            raise DataError(f"unknown data format '{fmt}'; choose from auto, {', '.join(KINDS)}")
        raise DataError(
            f"{where}: cannot tell the format from the fields {sorted(data)}; expected 'text', "
            "'prompt' + 'completion', 'messages' or 'conversations'"
        )
    if kind == "text":
        return Example("text", where, text=_nonempty_str(data, "text", where))
    if kind == "prompt_completion":
        return _prompt_completion(data, where)
    tools = _tools(data.get("tools"), where)
    if "messages" in data:
        messages = _messages(data["messages"], "messages", where)
    elif "conversations" in data:
        messages = _sharegpt(data, where)
    else:
        raise DataError(f"{where}: missing field 'messages' (conversational data)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages has no assistant turn, so there is nothing to train on")
    field = "messages" if "messages" in data else "conversations"
    shift = len(messages) - len(data[field])  # ShareGPT's `system` field becomes a first message
    _check_turns(messages, field, where, sharegpt=field == "conversations", shift=shift)
    last = messages[-1]["role"]
    if last != "assistant":
        raise DataError(f"{where}: {field} ends on a {last} turn ({field}[{len(messages) - 1 - shift}]), which nothing "
                        "after it is trained on: end the conversation with the assistant's answer, or drop that turn")
    return Example("conversational", where, messages=messages, tools=tools)


def to_examples(records: list[Record], fmt: str = "auto") -> list[Example]:
    """Validate a whole data set. With `fmt="auto"` the format is detected once, from the first row,
    and every later row must match it (a stray row of another format is an error, not a silent switch)."""
    if not records:
        return []
    if fmt == "auto":
        fmt = detect_format(records[0].data) or "auto"
        first = records[0].origin
        for rec in records:
            got = detect_format(rec.data)
            if got and got != fmt:
                raise DataError(f"{rec.origin}: row is {got} but the data set is {fmt} (detected from {first})")
    return [to_example(r, fmt) for r in records]


def _nonempty_str(data: dict, key: str, where: str, path: str = "") -> str:
    name = f"{path}{key}"
    if key not in data:
        raise DataError(f"{where}: missing field '{name}'")
    v = data[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {name} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: {name} is empty")
    return v


def _prompt_completion(data: dict, where: str) -> Example:
    for key in ("prompt", "completion"):
        if key not in data:
            raise DataError(f"{where}: missing field '{key}' (prompt-completion data)")
    p, c = data["prompt"], data["completion"]
    if isinstance(p, str):
        if not isinstance(c, str):
            raise DataError(f"{where}: completion must be a string when prompt is a string, got {type(c).__name__}")
        return Example("prompt_completion", where, prompt=_nonempty_str(data, "prompt", where),
                       completion=_nonempty_str(data, "completion", where))
    if not isinstance(p, list):
        raise DataError(f"{where}: prompt must be a string or a list of messages, got {type(p).__name__}")
    prompt = _messages(p, "prompt", where)
    if isinstance(c, str):  # a conversational prompt with a bare answer: the answer is the assistant's
        c = [{"role": "assistant", "content": c}]
    if not isinstance(c, list):
        raise DataError(f"{where}: completion must be a string or a list of messages, got {type(c).__name__}")
    completion = _messages(c, "completion", where)
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError(f"{where}: completion has no assistant message, so there is nothing to train on")
    _check_turns(prompt, "prompt", where)
    _check_turns(completion, "completion", where, after=prompt)
    return Example("prompt_completion", where, prompt=prompt, completion=completion,
                   tools=_tools(data.get("tools"), where))


def _messages(msgs: Any, field: str, where: str) -> list[dict]:
    if not isinstance(msgs, list):
        raise DataError(f"{where}: {field} must be a list of messages, got {type(msgs).__name__}")
    if not msgs:
        raise DataError(f"{where}: {field} is empty")
    out = []
    for i, m in enumerate(msgs):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise DataError(f"{where}: missing field '{at}.role'")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{where}: {at}.role must be one of {'/'.join(ROLES)}, got {role!r}")
        msg = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{where}: {at}.tool_calls is only allowed on assistant messages, got role {role!r}")
            msg["tool_calls"] = _tool_calls(calls, f"{at}.tool_calls", where)
        if calls and m.get("content") in (None, ""):
            msg["content"] = ""  # a pure tool call: the call itself is the trained text
        else:
            msg["content"] = _nonempty_str(m, "content", where, f"{at}.")
        out.append(msg)
    return out


def _check_turns(msgs: list[dict], field: str, where: str, *, after: Optional[list[dict]] = None,
                 sharegpt: bool = False, shift: int = 0) -> None:
    """Reject a system message after the first turn and a tool message that answers no call.

    `after` holds the turns before these (a completion's prompt). ShareGPT writes the call as the
    text of a `function_call` turn, so there any assistant turn may precede a tool result. The first
    `shift` messages were not in `field` (ShareGPT's `system`), so indices in messages skip them.
    """
    before = list(after or [])
    for i, m in enumerate(msgs):
        at, role = f"{field}[{i - shift}]", m["role"]
        if role == "system" and any(b["role"] != "system" for b in before):
            raise DataError(f"{where}: {at} is a system message after the conversation started; a system message "
                            "may only come first (move it to the start, or merge it into the first one)")
        if role == "tool":
            prev = next((b for b in reversed(before) if b["role"] != "tool"), None)
            calls = prev is not None and prev["role"] == "assistant" and (sharegpt or bool(prev.get("tool_calls")))
            if not calls:
                raise DataError(f"{where}: {at} is a tool result with no tool call before it (a tool message must "
                                "follow an assistant message with tool_calls)")
        before.append(m)


def _tool_calls(calls: Any, at: str, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError(f"{where}: {at} must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise DataError(f"{where}: {at}[{j}] must be an object, got {type(call).__name__}")
        fn = call.get("function", call)  # accept the OpenAI shape and the flat {name, arguments}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: {at}[{j}] needs a function name (function.name)")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise DataError(f"{where}: {at}[{j}].function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise DataError(f"{where}: {at}[{j}].function.arguments must be an object, got {type(args).__name__}")
        full = {k: v for k, v in call.items() if k not in ("function", "name", "arguments")}
        full.update(type="function", function={"name": fn["name"], "arguments": args})
        out.append(full)
    return out


def _tools(tools: Any, where: str) -> Optional[list[dict]]:
    if tools is None:
        return None
    if isinstance(tools, str):  # ShareGPT tool data sets often store the schemas as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise DataError(f"{where}: tools is a string but not valid JSON") from None
        if tools is None:
            return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: tools must be a list of JSON schemas (objects)")
    return tools


def _sharegpt(data: dict, where: str) -> list[dict]:
    conv = data["conversations"]
    if not isinstance(conv, list):
        raise DataError(f"{where}: conversations must be a list, got {type(conv).__name__}")
    if not conv:
        raise DataError(f"{where}: conversations is empty")
    msgs = []
    system = data.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system})
    names = "/".join(SHAREGPT_ROLES)
    for i, turn in enumerate(conv):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {at} must be an object with 'from' and 'value', got {type(turn).__name__}")
        if "from" not in turn:
            raise DataError(f"{where}: missing field '{at}.from'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower()) if isinstance(turn["from"], str) else None
        if role is None:
            raise DataError(f"{where}: {at}.from must be one of {names}, got {turn['from']!r}")
        msgs.append({"role": role, "content": _nonempty_str(turn, "value", where, f"{at}.")})
    return msgs
