"""The OpenAI wire format: request bodies, validated with the field named on error, and error bodies.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status that OpenAI and vLLM use: 400 for a malformed body (``param`` names the field),
401 for a missing or wrong API key, 404 for an unknown model (the message lists the names).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # unknown fields are ignored, as OpenAI's API and vLLM do (clients send vendor extensions)
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (load tests)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCallIn(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None

    def for_template(self) -> dict:
        """The plain dict a chat template reads (text parts joined, `developer` read as `system`)."""
        text = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {
                "name": c.function.name,
                "arguments": json.loads(c.function.arguments) if isinstance(c.function.arguments, str)
                and c.function.arguments.strip() else (c.function.arguments or {})}} for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(_Body):
    name: str
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None

    def completion_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)


def parse_body(raw: bytes, schema: type[BaseModel]):
    """The request body as `schema`, or an APIError 400 whose message and `param` name the field."""
    try:
        data = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # a union reports the branch it tried ('function', 'str') after the field; keep the field path
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        field = ".".join(loc)
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
        raise APIError(400, f"{field}: {msg}{got}", param=field) from None


_TYPE_TAGS = {"str", "int", "list", "dict", "float", "bool", "function", "literal", "NamedToolChoice",
              "ContentPart", "list[str]", "list[int]", "list[ContentPart]"}
