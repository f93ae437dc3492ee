"""Request bodies: a malformed field is a 400 that names it (no model needed)."""

import json

import pytest

from posttrain.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_body

MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body,param,message", [
    ({"model": "m", "messages": MSG, "tool_choice": "sometimes"}, "tool_choice",
     "tool_choice: Input should be 'none', 'auto' or 'required' (got \"sometimes\")"),
    ({"model": "m", "messages": []}, "messages",
     "messages: List should have at least 1 item after validation, not 0 (got [])"),
    ({"model": "m", "messages": MSG, "stop": 5}, "stop", "stop: Input should be a valid string (got 5)"),
    ({"model": "m", "messages": MSG, "top_p": 0}, "top_p", "top_p: Input should be greater than 0 (got 0)"),
    ({"messages": MSG}, "model", "model: field required"),
])
def test_chat_body_errors_name_the_field(body, param, message):
    with pytest.raises(APIError) as e:
        parse_body(json.dumps(body).encode(), ChatRequest)
    assert (e.value.status, e.value.param, e.value.message) == (400, param, message)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_body_must_be_a_json_object():
    with pytest.raises(APIError, match="the request body must be a JSON object, got list"):
        parse_body(b"[1]", CompletionRequest)


def test_defaults_and_extras():
    b = parse_body(json.dumps({"model": "m", "prompt": "hi", "vendor_field": 1}).encode(), CompletionRequest)
    assert (b.max_tokens, b.temperature, b.n, b.stops()) == (16, 1.0, 1, ())
    c = parse_body(json.dumps({"model": "m", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "stop": "x"}).encode(), ChatRequest)
    assert c.messages[0].for_template() == {"role": "system", "content": "ab"}
    assert c.stops() == ("x",)
