"""Tool-call parsing, JSON-Schema checking, and the tool-call / JSON rewards."""

import json

import pytest

from posttrain.rewards import (
    ToolCall,
    ToolCallParseError,
    json_schema_reward,
    parse_tool_calls,
    schema_errors,
    tool_call_reward,
    validate_call,
    validate_json,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city"]}}}
SEARCH = {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"},
    "filters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "since": {"type": ["integer", "null"]},
        "exact": {"type": "boolean"}},
        "required": ["tags"], "additionalProperties": False},
    "limit": {"type": "number"}}, "required": ["query"]}}
TOOLS = [WEATHER, SEARCH]


def test_parse_hermes_blocks_bare_json_lists_and_string_arguments():
    text = ('<think>the user wants weather</think>\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}'
            '</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("search", {"query": "x"})]
    assert parse_tool_calls('  {"name": "search", "parameters": {"query": "y"}} ') == [ToolCall("search", {"query": "y"})]
    assert parse_tool_calls('[{"name": "a", "arguments": {}}, {"type": "function", "function": '
                            '{"name": "b", "arguments": "{}"}}]') == [ToolCall("a", {}), ToolCall("b", {})]
    assert parse_tool_calls('```json\n{"name": "a"}\n```') == [ToolCall("a", {})]
    # generation stopped before the closing tag
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {"k": 1}}') == [ToolCall("a", {"k": 1})]
    assert parse_tool_calls("It is sunny in Paris today.") == []
    assert parse_tool_calls([{"role": "assistant", "content": '{"name": "a"}'}]) == [ToolCall("a", {})]


@pytest.mark.parametrize("text,message", [
    ('<tool_call>{"name": "a", "arguments": {"k": }</tool_call>', r"<tool_call> block 0: invalid JSON \(Expecting value"),
    ('{"arguments": {}}', r"JSON call: missing function 'name' \(keys: \['arguments'\]\)"),
    ('[{"name": "a"}, 3]', "JSON call item 1: a call must be a JSON object, got int"),
    ('{"name": "a", "arguments": "{oops"}', r"JSON call \(a\) arguments string: invalid JSON"),
    ('{"name": "a", "arguments": [1]}', r"JSON call \(a\): arguments must be an object, got list"),
    ("<think>planning a call", "<think> block is never closed"),
])
def test_malformed_calls_raise_with_location(text, message):
    with pytest.raises(ToolCallParseError, match=message):
        parse_tool_calls(text)


@pytest.mark.parametrize("call,reason", [
    (ToolCall("get_weather", {"city": "Paris", "unit": "celsius", "days": 3}), ""),
    (ToolCall("get_weather", {"city": "Paris", "days": 3.0}), ""),  # 3.0 is an integer in JSON Schema
    (ToolCall("get_wether", {"city": "Paris"}), "unknown function 'get_wether' (offered: ['get_weather', 'search'])"),
    (ToolCall("get_weather", {"unit": "celsius"}), "get_weather: arguments: missing required property 'city'"),
    (ToolCall("get_weather", {"city": 7}), "get_weather: arguments.city: expected string, got integer 7"),
    (ToolCall("get_weather", {"city": "P", "unit": "kelvin"}),
     "get_weather: arguments.unit: expected one of ['celsius', 'fahrenheit'], got 'kelvin'"),
    (ToolCall("get_weather", {"city": "P", "days": 2.5}), "get_weather: arguments.days: expected integer, got number 2.5"),
    (ToolCall("get_weather", {"city": "P", "days": True}), "get_weather: arguments.days: expected integer, got boolean True"),
    (ToolCall("get_weather", {"city": "P", "days": 9}), "get_weather: arguments.days: 9 is greater than 7"),
    (ToolCall("search", {"query": "q", "filters": {"tags": ["a", 2]}}),
     "search: arguments.filters.tags[1]: expected string, got integer 2"),
    (ToolCall("search", {"query": "q", "filters": {"tags": [], "since": None, "exact": False}}), ""),
    (ToolCall("search", {"query": "q", "filters": {"tags": [], "since": "2020"}}),
     "search: arguments.filters.since: expected integer or null, got string '2020'"),
    (ToolCall("search", {"query": "q", "filters": {"tags": [], "colour": "red"}}),
     "search: arguments.filters: unexpected property 'colour' (allowed: ['exact', 'since', 'tags'])"),
    (ToolCall("search", {"query": "q", "filters": {}}), "search: arguments.filters: missing required property 'tags'"),
    (ToolCall("search", {"query": "q", "filters": {"tags": ["a", "b", "c", "d"]}}),
     "search: arguments.filters.tags: more than 3 items"),
    (ToolCall("search", {"query": "q", "limit": "10"}), "search: arguments.limit: expected number, got string '10'"),
])
def test_validate_call(call, reason):
    assert validate_call(call, TOOLS) == (reason == "", reason)


def test_schema_keywords_beyond_tools():
    s = {"anyOf": [{"type": "string", "pattern": "^[a-z]+$"}, {"type": "integer", "exclusiveMinimum": 0}]}
    assert validate_json("abc", s) == (True, "")
    assert validate_json(5, s) == (True, "")
    assert validate_json("ABC", s)[0] is False and validate_json(0, s)[0] is False
    one = {"oneOf": [{"type": "number"}, {"type": "integer"}]}
    assert validate_json(1.5, one) == (True, "")
    assert validate_json(2, one) == (False, "$: must match exactly one of oneOf, matches 2")
    assert schema_errors({"a": 1, "b": "x"}, {"type": "object", "additionalProperties": {"type": "integer"}}) == [
        "$.b: expected integer, got string 'x'"]
    assert validate_json("x", {"const": "y"}) == (False, "$: expected 'y', got 'x'")
    assert validate_json("abcd", {"type": "string", "maxLength": 3}) == (False, "$: longer than 3 characters")
    with pytest.raises(ValueError, match="unknown JSON-Schema type 'str'"):
        validate_json("x", {"type": "str"})


def test_tool_call_reward_with_expected_calls_and_no_call_rows():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    completions = [
        call,                                                # right call
        call,                                                # a call where none was relevant
        "I can't look that up, but it is usually mild.",     # no call where none was relevant
        '<tool_call>{"name": "search", "arguments": {"query": "Paris"}}</tool_call>',  # wrong function
        '<tool_call>{"name": "get_weather", "arguments": {"city": 1}}</tool_call>',    # wrong type
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',       # malformed
        "Here you go.",                                      # no call where one was expected
        call,                                                # row without tools: not applicable
    ]
    expected = [{"name": "get_weather", "arguments": {"city": "Paris"}}, None, None,
                {"name": "get_weather", "arguments": {"city": "Paris"}},
                {"name": "get_weather", "arguments": {"city": "Paris"}},
                json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
                {"name": "get_weather", "arguments": {"city": "Paris"}}, None]
    tools = [TOOLS] * 7 + [None]
    scores = tool_call_reward([""] * 8, completions, tools=tools, expected_call=expected)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, None]


def test_tool_call_reward_argument_matching_and_validity_only_mode():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon"}}</tool_call>'
    expected = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert tool_call_reward([""], [call], tools=[TOOLS], expected_call=expected) == [1.0]
    assert tool_call_reward([""], [call], tools=[TOOLS], expected_call=expected, match_arguments=True) == [0.0]
    # without an expected_call column: any valid call scores, no call or an invalid one does not
    assert tool_call_reward([""] * 3, [call, "no call", '{"name": "nope"}'], tools=[TOOLS] * 3) == [1.0, 0.0, 0.0]
    assert tool_call_reward([""], [call]) == [None]
    assert tool_call_reward([""], [call], tools=[json.dumps(TOOLS)]) == [1.0]


def test_bad_tool_definition_is_a_clear_error():
    with pytest.raises(ValueError, match=r"tools\[0\]: expected \{'type': 'function'"):
        validate_call(ToolCall("a", {}), [{"description": "no name"}])


def test_json_schema_reward():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    completions = ['{"name": "Ada", "age": 36}', '```json\n{"name": "Ada", "age": 36}\n```',
                   '{"name": "Ada"}', "Ada, 36", '<think>format</think>{"name": "Ada", "age": 36}', "{}"]
    assert json_schema_reward([""] * 6, completions, schema=[schema] * 5 + [None]) == [1.0, 1.0, 0.0, 0.0, 1.0, None]
