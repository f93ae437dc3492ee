"""JSON-Schema validation through jsonschema, with our error wording."""

import pytest

from posttrain.rewards.schema import SchemaError, schema_errors, validate_json


def test_keywords_the_old_checker_lacked_now_work():
    s = {"$defs": {"unit": {"enum": ["c", "f"]}}, "type": "object",
         "properties": {"u": {"$ref": "#/$defs/unit"}, "tags": {"type": "array", "uniqueItems": True}},
         "patternProperties": {"^x_": {"type": "integer"}}}
    assert schema_errors({"u": "c", "tags": [1, 2], "x_a": 3}, s) == []
    assert schema_errors({"u": "k", "tags": [1, 1], "x_a": "3"}, s) == [
        "$.u: expected one of ['c', 'f'], got 'k'", "$.tags: [1, 1] has non-unique elements",
        "$.x_a: expected integer, got string '3'"]


def test_errors_name_the_path_and_a_wrong_type_is_reported_once():
    s = {"type": "object", "properties": {"x": {"type": "object", "properties": {
        "y": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}}
    assert schema_errors({"x": {"y": [1, "a"]}}, s, "arguments") == [
        "arguments.x.y[1]: matches none of anyOf (arguments.x.y[1]: expected integer, got string 'a')"]
    # enum/minLength add nothing once the type is wrong
    assert schema_errors(5, {"type": "string", "enum": ["a"], "minLength": 2}) == ["$: expected string, got integer 5"]
    both = {"type": "object", "properties": {"u": {"type": "string"}}, "additionalProperties": False,
            "required": ["a", "b"]}
    assert schema_errors({"u": "k", "v": 1}, both) == [
        "$: unexpected property 'v' (allowed: ['u'])", "$: missing required property 'a'",
        "$: missing required property 'b'"]
    assert validate_json(True, {"type": "number"}) == (False, "$: expected number, got boolean True")
    assert validate_json(3.0, {"type": "integer"}) == (True, "")


def test_a_malformed_schema_is_a_schema_error():
    with pytest.raises(SchemaError, match=r"^schema.properties.a.minimum: invalid schema: 'x' is not of type 'number'$"):
        schema_errors(1, {"type": "object", "properties": {"a": {"minimum": "x"}}})
    with pytest.raises(SchemaError, match=r"^schema.type: unknown JSON-Schema type 'str'$"):
        schema_errors(1, {"type": "str"})
    with pytest.raises(SchemaError, match="a schema must be an object or a boolean, got list"):
        schema_errors(1, [])
    assert schema_errors(1, False) == ["$: no value is allowed here"] and schema_errors(1, True) == []
