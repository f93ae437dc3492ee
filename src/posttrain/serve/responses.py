"""From an OpenAI request to a prompt, and from finished (or streaming) engine requests to OpenAI's JSON.

Chat prompts go through the model's chat template with `posttrain.data.tools.render_prompt`,
which also applies the documented fallback for templates that know nothing of tools (see
docs/tools.md), and tool calls in the answer are read back with
`posttrain.rewards.tools.parse_tool_calls`: the same two functions the training side uses, so
a model trained on tool conversations is prompted and parsed the way it was trained.

``tool_choice``: ``auto`` (the default with tools) offers the tools and parses calls; ``none``
leaves the tools out of the prompt and parses nothing; ``required`` and a named function start
the answer with ``<tool_call>{"name": "`` (and the function's name, less its closing quote), the
call format of the fallback, Qwen and Hermes templates, so the model can only continue a call.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from posttrain.data.tools import render_prompt
from posttrain.rewards.tools import ToolCallParseError, parse_tool_calls
from posttrain.serve.requests import Delta, Request, TokenLogprob
from posttrain.serve.protocol import APIError, ChatRequest, CompletionRequest, NamedToolChoice

CALL_OPEN = "<tool_call>"


def render(tokenizer, body: ChatRequest) -> tuple[str, str]:
    """(prompt text, forced start of the answer) for a chat request."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if choice != "none" and not body.tools:
        raise APIError(400, f"tool_choice {_choice_name(choice)!r} needs 'tools'", param="tool_choice")
    tools = [t.model_dump() for t in body.tools] if body.tools and choice != "none" else None
    messages = [m.for_template() for m in body.messages]
    try:
        prompt = render_prompt(tokenizer, messages, tools)
    except Exception as e:  # jinja raises its own errors for conversations a template refuses
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
    forced = ""
    if choice == "required":
        forced = CALL_OPEN + '{"name": "'
    elif isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        offered = [t.function.name for t in body.tools]
        if name not in offered:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools ({offered})",
                           param="tool_choice.function.name")
        # stop inside the name's closing quote: a forced text that ends where the model's own tokens would
        # not end (after `"get_weather"`, or after `"arguments": `) was measured to lead the bundled model astray
        forced = CALL_OPEN + json.dumps({"name": name})[:-2]
    return prompt + forced, forced


def _choice_name(choice) -> str:
    return choice if isinstance(choice, str) else f"function {choice.function.get('name')}"


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """Token ids of each prompt of /v1/completions (a string, a list of strings, or one list of ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < len(tokenizer)]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{len(tokenizer) - 1})",
                           param="prompt")
        out = [list(prompt)]
    else:
        out = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompt]
    if not out or any(not ids for ids in out):
        raise APIError(400, "prompt is empty: give at least one token of text", param="prompt")
    return out


def _finish(reason: Optional[str]) -> Optional[str]:
    # a cancelled request has no reader; "error" never reaches a client as a finish reason (a 500 does)
    return {"cancelled": "abort", "error": "abort"}.get(reason, reason)


class _Shape:
    prefix = ""

    def __init__(self, body, tokenizer):
        self.body, self.tok = body, tokenizer
        self.id = self.prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model}

    def _token(self, t: int) -> str:
        return self.tok.decode([t])

    def usage(self, reqs: list[Request]) -> dict:
        # the n choices of a prompt are consecutive and share it: its tokens count once
        prompt = sum(len(r.prompt_ids) for r in reqs[::self.body.n])
        done = sum(len(r.tokens) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def stream_end(self, reqs: list[Request]):
        opts = self.body.stream_options
        if opts is not None and opts.include_usage:
            yield {**self._head(self.chunk_object), "choices": [], "usage": self.usage(reqs)}


class ChatShape(_Shape):
    prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def __init__(self, body: ChatRequest, tokenizer, forced: str):
        super().__init__(body, tokenizer)
        self.forced = forced
        self.parse_tools = bool(body.tools) and (body.tool_choice or "auto") != "none"

    def message(self, req: Request) -> tuple[dict, Optional[str]]:
        """The assistant message and finish reason of one finished request."""
        text = self.forced + req.text
        reason = _finish(req.finish_reason)
        if self.parse_tools:
            try:
                calls = parse_tool_calls(text)
            except ToolCallParseError:
                calls = []  # a malformed call is returned as text, for the client to see
            if calls:
                before = text.split(CALL_OPEN, 1)[0].strip() if CALL_OPEN in text else ""
                return {"role": "assistant", "content": before or None, "tool_calls": [
                    {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                    for c in calls]}, "tool_calls"
        return {"role": "assistant", "content": text}, reason

    def logprobs(self, lps: list[TokenLogprob]) -> Optional[dict]:
        if not self.body.logprobs:
            return None
        return {"content": [{"token": self._token(lp.token), "logprob": lp.logprob,
                             "bytes": list(self._token(lp.token).encode()),
                             "top_logprobs": [{"token": self._token(t), "logprob": v,
                                               "bytes": list(self._token(t).encode())} for t, v in lp.top]}
                            for lp in lps]}

    def response(self, reqs: list[Request]) -> dict:
        choices = []
        for i, r in enumerate(reqs):
            msg, reason = self.message(r)
            choices.append({"index": i, "message": msg, "logprobs": self.logprobs(r.token_logprobs),
                            "finish_reason": reason})
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(reqs)}

    def stream_start(self):
        for i in range(self.body.n):
            yield {**self._head(self.chunk_object), "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def stream_delta(self, i: int, req: Request, d: Delta):
        if self.parse_tools:
            # calls are parsed from the whole answer, so with tools the answer comes in one delta at the end
            if d.finish_reason is None:
                return
            msg, reason = self.message(req)
            msg.pop("role")
            if msg.get("tool_calls"):
                for k, c in enumerate(msg["tool_calls"]):
                    c["index"] = k
            yield {**self._head(self.chunk_object), "choices": [
                {"index": i, "delta": msg, "logprobs": self.logprobs(req.token_logprobs), "finish_reason": reason}]}
            return
        if d.text or d.logprobs:
            yield {**self._head(self.chunk_object), "choices": [
                {"index": i, "delta": {"content": d.text}, "logprobs": self.logprobs(d.logprobs),
                 "finish_reason": None}]}
        if d.finish_reason is not None:
            yield {**self._head(self.chunk_object), "choices": [
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish(d.finish_reason)}]}


class CompletionShape(_Shape):
    prefix = "cmpl-"
    chunk_object = "text_completion"

    def logprobs(self, lps: list[TokenLogprob], offset: int = 0) -> Optional[dict]:
        if self.body.logprobs is None:
            return None
        tokens = [self._token(lp.token) for lp in lps]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self._token(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

    def response(self, reqs: list[Request]) -> dict:
        choices = [{"index": i, "text": r.text, "logprobs": self.logprobs(r.token_logprobs),
                    "finish_reason": _finish(r.finish_reason)} for i, r in enumerate(reqs)]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(reqs)}

    def stream_start(self):
        return ()

    def stream_delta(self, i: int, req: Request, d: Delta):
        if d.text or d.logprobs or d.finish_reason is not None:
            yield {**self._head(self.chunk_object), "choices": [
                {"index": i, "text": d.text, "logprobs": self.logprobs(d.logprobs),
                 "finish_reason": _finish(d.finish_reason)}]}
