"""JSON-Schema validation of tool-call arguments, through the `jsonschema` package (Draft 2020-12).

`jsonschema` decides validity; this module only words its errors the way the tool rewards
report them: ``"<path>: <what is wrong>"``, with paths like ``$.location.unit`` or
``$.items[2]``. When a value has the wrong type, that is the only error reported for it (the
keywords that depend on the type add nothing). Booleans are not numbers and ``3.0`` is an
integer, as JSON Schema says (unlike Python's ``bool <: int``).

A malformed schema (a tool definition bug, not a model error) raises `SchemaError`.
"""

from __future__ import annotations

import json
from functools import lru_cache

import jsonschema
from jsonschema import Draft202012Validator


class SchemaError(ValueError):
    """The schema itself is malformed (a tool definition bug, not a model error)."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value) -> str:
    for name, kind in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                       ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _where(root: str, parts) -> str:
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


_BOUNDS = {"minimum": "less than", "maximum": "greater than", "exclusiveMinimum": "at most",
           "exclusiveMaximum": "at least"}
_SIZES = {"minLength": "shorter than {} characters", "maxLength": "longer than {} characters",
          "minItems": "fewer than {} items", "maxItems": "more than {} items"}


def _messages(err: jsonschema.ValidationError, validator: Draft202012Validator, root: str) -> list[str]:
    """Our wording of one jsonschema error (without the path); a keyword we do not word keeps theirs."""
    kw, want, value = err.validator, err.validator_value, err.instance
    if kw == "type":
        names = [want] if isinstance(want, str) else list(want)
        return [f"expected {' or '.join(names)}, got {_type_name(value)} {_show(value)}"]
    if kw == "enum":
        return [f"expected one of {want}, got {_show(value)}"]
    if kw == "const":
        return [f"expected {_show(want)}, got {_show(value)}"]
    if kw in _SIZES:
        return [_SIZES[kw].format(want)]
    if kw in _BOUNDS:
        return [f"{value} is {_BOUNDS[kw]} {want}"]
    if kw == "pattern":
        return [f"does not match pattern {want!r}"]
    if kw == "required":  # jsonschema reports one error per missing name; we report them all at once
        return [f"missing required property {k!r}" for k in want if k not in value]
    if kw == "additionalProperties" and want is False:
        allowed = sorted(err.schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        return [f"unexpected property {k!r} (allowed: {allowed})" for k in extra]
    if kw == "anyOf":
        branches: dict[int, list[str]] = {}
        for sub in err.context:
            branches.setdefault(sub.schema_path[0], []).extend(_format(sub, validator, root))
        best = min(branches.values(), key=len) if branches else [err.message]
        return [f"matches none of anyOf ({best[0]})"]
    if kw == "oneOf":
        passing = sum(validator.evolve(schema=sub).is_valid(value) for sub in want)
        return [f"must match exactly one of oneOf, matches {passing}"]
    return [err.message]


def _format(err, validator, root: str) -> list[str]:
    where = _where(root, err.absolute_path)  # a sub-error of anyOf includes its parent's path
    return [f"{where}: {m}" for m in _messages(err, validator, root)]


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = _where("schema", e.absolute_path)
        if "type" in e.absolute_path:
            raise SchemaError(f"{where}: unknown JSON-Schema type {e.instance!r}") from None
        raise SchemaError(f"{where}: invalid schema: {e.message}") from None
    return Draft202012Validator(schema)


def schema_errors(value, schema: dict | bool, path: str = "$") -> list[str]:
    """Every violation of ``schema`` by ``value``, each as ``"<path>: <what is wrong>"``.

    An empty list means ``value`` is valid. Paths read like ``$.location.unit`` or ``$.items[2]``.
    """
    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"{path}: a schema must be an object or a boolean, got {type(schema).__name__}")
    if schema is False:
        return [f"{path}: no value is allowed here"]
    validator = _validator(json.dumps(schema))  # keys kept in order: errors follow the schema's order
    found = list(validator.iter_errors(value))
    mistyped = {tuple(e.absolute_path) for e in found if e.validator == "type"}
    errors: list[str] = []
    for e in found:
        if e.validator != "type" and tuple(e.absolute_path) in mistyped:
            continue  # the wrong type says it all
        for line in _format(e, validator, path):
            if line not in errors:  # jsonschema repeats `required` once per missing name
                errors.append(line)
    return errors


def validate_json(value, schema: dict) -> tuple[bool, str]:
    """``(True, "")`` when ``value`` satisfies ``schema``, else ``(False, first error)``."""
    errors = schema_errors(value, schema)
    return (not errors, errors[0] if errors else "")
