"""A small JSON-Schema checker: the subset that OpenAI-style tool definitions use.

Supported keywords: ``type`` (string, number, integer, boolean, null, array, object, or a list
of these), ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties`` (bool or
schema), ``items``, ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``,
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``anyOf``/``oneOf``/``allOf``.
Other keywords (``description``, ``format``, ``default``, ``title``...) are ignored, as JSON
Schema allows. Booleans are not numbers here (JSON Schema's rule, unlike Python's ``bool <: int``),
and ``3.0`` is an integer (JSON Schema counts by value).
"""

from __future__ import annotations

import re


class SchemaError(ValueError):
    """The schema itself is malformed (a tool definition bug, not a model error)."""


def _is_type(value, name: str, where: str) -> bool:
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise SchemaError(f"{where}: unknown JSON-Schema type {name!r}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """Every violation of ``schema`` by ``value``, each as ``"<path>: <what is wrong>"``.

    An empty list means ``value`` is valid. Paths read like ``$.location.unit`` or ``$.items[2]``.
    """
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be an object or a boolean, got {type(schema).__name__}")
    errors: list[str] = []

    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t, path) for t in names):
            want = names[0] if len(names) == 1 else " or ".join(names)
            return [f"{path}: expected {want}, got {_type_name(value)} {_show(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: expected one of {schema['enum']}, got {_show(value)}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {_show(schema['const'])}, got {_show(value)}")

    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match pattern {schema['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, bad, word in (("minimum", lambda v, b: v < b, "less than"),
                               ("maximum", lambda v, b: v > b, "greater than"),
                               ("exclusiveMinimum", lambda v, b: v <= b, "at most"),
                               ("exclusiveMaximum", lambda v, b: v >= b, "at least")):
            if key in schema and bad(value, schema[key]):
                errors.append(f"{path}: {value} is {word} {schema[key]}")
    if isinstance(value, list):
        errors += _array_errors(value, schema, path)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)

    for sub in schema.get("allOf", []):
        errors += schema_errors(value, sub, path)
    if "anyOf" in schema:
        branches = [schema_errors(value, sub, path) for sub in schema["anyOf"]]
        if all(branches):
            errors.append(f"{path}: matches none of anyOf ({min(branches, key=len)[0]})")
    if "oneOf" in schema:
        passing = sum(not schema_errors(value, sub, path) for sub in schema["oneOf"])
        if passing != 1:
            errors.append(f"{path}: must match exactly one of oneOf, matches {passing}")
    return errors


def _array_errors(value: list, schema: dict, path: str) -> list[str]:
    errors = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{path}: fewer than {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: more than {schema['maxItems']} items")
    items = schema.get("items")
    if isinstance(items, (dict, bool)):
        for i, item in enumerate(value):
            errors += schema_errors(item, items, f"{path}[{i}]")
    return errors


def _object_errors(value: dict, schema: dict, path: str) -> list[str]:
    errors = []
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            errors.append(f"{path}: missing required property {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            errors += schema_errors(item, props[key], f"{path}.{key}")
        elif extra is False:
            errors.append(f"{path}: unexpected property {key!r} (allowed: {sorted(props)})")
        elif isinstance(extra, dict):
            errors += schema_errors(item, extra, f"{path}.{key}")
    return errors


def _type_name(value) -> str:
    for name, kind in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                       ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def validate_json(value, schema: dict) -> tuple[bool, str]:
    """``(True, "")`` when ``value`` satisfies ``schema``, else ``(False, first error)``."""
    errors = schema_errors(value, schema)
    return (not errors, errors[0] if errors else "")
