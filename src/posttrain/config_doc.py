"""Every config key with its type, default and description, read from the pydantic schemas.

    posttrain sft --help          # format_help: keys grouped by section
    posttrain config sft --doc    # format_yaml_doc: the resolved config as commented YAML

The descriptions are the schemas' own `Field(description=...)`; nothing here keeps a copy, so
the help cannot drift from the code.
"""

from __future__ import annotations

import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

WIDTH = 100


@dataclass(frozen=True)
class KeyDoc:
    key: str            # dotted: "train.lr"
    section: str        # "" for top-level keys, else the section's dotted name ("data", "data.mix")
    type: str           # "float | null", "lora | dora | ...", "section"
    default: Any        # the schema default; REQUIRED when there is none
    description: str


REQUIRED = object()


def _section_model(annotation) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `Optional[X]` or `X | None`, if any."""
    for t in typing.get_args(annotation) or (annotation,):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def type_name(annotation) -> str:
    """A short, YAML-minded name: `float | null`, `fp32 | bf16`, `list[str]`, `section`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:  # posttrain.data.hub.DatasetObject: a datasets object passed from Python
        return "Dataset"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def keys(schema: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """Every key of `schema`, sections recursed into, in declaration order."""
    out = []
    for name, field in schema.model_fields.items():
        key = prefix + name
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = REQUIRED
        sub = _section_model(field.annotation)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        out.append(KeyDoc(key, prefix.rstrip("."), type_name(field.annotation), default,
                          " ".join((field.description or "").split())))
        if sub is not None:
            out.extend(keys(sub, key + "."))
    return out


def _show(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    if isinstance(value, dict) and value:
        return "{...}"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def format_help(schema: type[BaseModel], width: int = WIDTH) -> str:
    """Keys grouped by section: `key  type = default` on one line, the description wrapped beneath."""
    groups: dict[str, list[str]] = {}
    for k in keys(schema):
        if k.type == "section":  # a section always present: its keys follow under its own heading
            groups.setdefault(k.key, []).extend(_wrap(k.description, width, "  "))
            continue
        lines = groups.setdefault(k.section, [])
        # a long type (a list of many choices) wraps under the key rather than overflowing the width
        lines += textwrap.wrap(f"{k.key}  {k.type} = {_show(k.default)}", width, initial_indent="  ",
                               subsequent_indent="        ", break_long_words=False, break_on_hyphens=False)
        lines += _wrap(k.description, width, "      ")
    return "\n\n".join("\n".join([f"{name}.*" if name else "top level", *lines]) for name, lines in groups.items())


def _wrap(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False) if text else []


def format_yaml_doc(cfg: BaseModel, width: int = WIDTH) -> str:
    """`cfg` as YAML with each key's description (and type) as a comment above it; loads back to `cfg`."""
    docs = {k.key: k for k in keys(type(cfg))}
    return "\n".join(_yaml_lines(cfg.model_dump(mode="json"), "", 0, docs, width)) + "\n"


def _yaml_lines(tree: dict, prefix: str, depth: int, docs: dict[str, KeyDoc], width: int) -> list[str]:
    pad = "  " * depth
    out = []
    for name, value in tree.items():
        key = prefix + name
        d = docs.get(key)
        if d is not None and not (d.type == "section" and not d.description):
            out += _wrap(f"({d.type}) {d.description}".rstrip(), width, f"{pad}# ")
        if isinstance(value, dict) and value:
            out.append(f"{pad}{name}:")
            out += _yaml_lines(value, key + ".", depth + 1, docs, width)
        else:
            out.append(f"{pad}{name}: {_show(value)}")
    return out
