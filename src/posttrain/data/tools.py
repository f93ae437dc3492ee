"""Tool conversations for chat templates that know nothing of tools: the fallback format.

A template *supports tools* when its source mentions ``tools`` (Qwen2/2.5, Llama 3.1+, Mistral
v0.3, Hermes and the bundled gym model's template do); such a template renders schemas, calls
and results itself, and nothing here applies. For any other template (Llama 2, Llama 3.0,
Mistral v0.1, Gemma, plain ChatML) a tool conversation is first rewritten into ordinary
system/user/assistant turns, so that the template renders it and the loss mask stays right:

- the ``tools`` schemas go into the system turn (appended to the user's system message, or a
  new one): ``FALLBACK_HEADER``, then one JSON schema per line, then ``FALLBACK_INSTRUCTION``;
- each assistant call is appended to that assistant turn's content as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (what
  `posttrain.rewards.parse_tool_calls` reads back), so calls are trained like any answer;
- tool results become a user turn ``<tool_response>\\n...\\n</tool_response>`` (consecutive
  results share one turn, which keeps user/assistant alternation), so they are never trained.

The same rewriting builds generation prompts (`render_prompt`), so a model trained through the
fallback is prompted the way it was trained.
"""

from __future__ import annotations

import json
from typing import Optional

FALLBACK_HEADER = "You can call these tools (JSON schemas, one per line):"
FALLBACK_INSTRUCTION = ('To call a tool, answer with <tool_call>{"name": <tool name>, "arguments": '
                        '<arguments object>}</tool_call>; tool results come back inside <tool_response> tags.')


def supports_tools(tokenizer) -> bool:
    """True when the tokenizer's chat template renders tools itself (its source mentions `tools`)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def has_tool_content(messages: list[dict], tools: Optional[list[dict]]) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def call_text(call: dict) -> str:
    """One call in the fallback format; `call` is {"name", "arguments"} or the OpenAI {"function": {...}} shape."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return "<tool_call>" + json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False) + "</tool_call>"


def tools_text(tools: list[dict]) -> str:
    lines = [FALLBACK_HEADER] + [json.dumps(t, ensure_ascii=False) for t in tools] + [FALLBACK_INSTRUCTION]
    return "\n".join(lines)


def to_fallback(messages: list[dict], tools: Optional[list[dict]]) -> list[dict]:
    """`messages` rewritten into system/user/assistant turns carrying the tools, calls and results as text."""
    out: list[dict] = []
    if tools:
        listing = tools_text(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + listing})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for m in messages:
        if m["role"] == "tool":
            block = "<tool_response>\n" + str(m["content"]) + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        msg = {"role": m["role"], "content": m.get("content") or ""}
        calls = m.get("tool_calls") or []
        if calls:
            msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + "\n".join(call_text(c) for c in calls)
        out.append(msg)
    for m in out:
        m.pop("_tool_results", None)
    return out


def prepare(tokenizer, messages: list[dict], tools: Optional[list[dict]]) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, tools) as the template should see them: unchanged when it supports tools or the
    conversation has none, else the fallback rewriting with no separate tools."""
    if supports_tools(tokenizer) or not has_tool_content(messages, tools):
        return messages, tools
    return to_fallback(messages, tools), None


def render_prompt(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
    """The generation prompt of a (tool) conversation, with the fallback for templates without tools."""
    messages, tools = prepare(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
