"""The launch form, generated from a stage's typed config schema, and its validation.

Every leaf of the pydantic schema becomes one field with its description and default; what the
user changes becomes a ``key=value`` override, validated by `posttrain.stages.load_config`
exactly as the command line validates it, and each error line goes back to its field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from posttrain.config import ConfigError
from posttrain.stages import STAGES, load_config, schema

# Shown open at the top of the form; every other key is in its section, folded.
BASICS = ["model", "data.train", "data.eval", "data.limit", "output_dir", "adapter.type", "train.max_steps", "train.lr",
          "train.batch_size", "train.eval_every", "eval.regression_every"]


@dataclass
class Field:
    key: str  # dotted, as on the command line
    kind: str  # "text" | "select"
    default: str  # as the user would type it; "" for None
    description: str
    options: list[str] | None = None


def show(value) -> str:
    """A value as typed in a form field (and on the command line)."""
    if value is None or value is PydanticUndefined:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True).strip()
    return str(value)


def _section_type(ann):
    for t in typing.get_args(ann) or (ann,):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _options(ann) -> list[str] | None:
    if ann is bool:
        return ["true", "false"]
    if typing.get_origin(ann) is typing.Literal:
        return [show(a) for a in typing.get_args(ann)]
    if typing.get_origin(ann) is typing.Union:  # Optional[Literal[...]]
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            opts = _options(args[0])
            return None if opts is None else [""] + opts
    return None


def fields_of(model: type[BaseModel], prefix: str = "") -> list[Field]:
    """One `Field` per leaf key of `model`, in schema order (``stage`` is the command, not a field)."""
    out = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        if key == "stage":
            continue
        sub = _section_type(f.annotation)
        if sub is not None and f.default is not None:  # a section with defaults: its keys
            out += fields_of(sub, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not None else f.default
        opts = _options(f.annotation)
        out.append(Field(key, "select" if opts else "text", show(default), f.description or "", opts))
    return out


def form_fields(stage: str) -> list[tuple[str, list[Field]]]:
    """The form of `stage`: ("basics", ...) first, then one group per config section."""
    fields = fields_of(schema(stage))
    by_key = {f.key: f for f in fields}
    groups = [("basics", [by_key[k] for k in BASICS if k in by_key])]
    sections: dict[str, list[Field]] = {}
    for f in fields:
        if f.key not in BASICS:
            sections.setdefault(f.key.split(".")[0] if "." in f.key else "run", []).append(f)
    return groups + list(sections.items())


def overrides_from_form(stage: str, form: dict[str, str]) -> list[str]:
    """``key=value`` for every field whose value differs from its default (unknown keys are kept:
    the config loader then names them, with its did-you-mean)."""
    defaults = {f.key: f.default for f in fields_of(schema(stage))}
    out = []
    for key, value in form.items():
        value = value.strip()
        if key.startswith("_") or value == defaults.get(key, "") or (not value and key in defaults):
            continue
        out.append(f"{key}={value}")
    return out


def validate(stage: str, overrides: list[str]) -> tuple[object | None, dict[str, list[str]]]:
    """(config, {}) when the overrides load, else (None, {field key or "": [error lines]})."""
    try:
        return load_config(stage, None, overrides), {}
    except ConfigError as e:
        errors: dict[str, list[str]] = {}
        lines = str(e).splitlines()
        for line in lines[1:] or lines:
            line = line.strip().removeprefix(": ")  # a whole-config rule has no key
            key = ""
            if line.startswith("unknown key '"):
                key = line.split("'")[1]
            elif ": " in line and " " not in line.split(": ", 1)[0]:
                key = line.split(": ", 1)[0]
            errors.setdefault(key, []).append(line)
        return None, errors


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config mapping as ``{dotted key: value as typed}`` (to fill the form)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = show(v)
    return out


def from_recipe(path) -> tuple[str, dict[str, str], list[str]]:
    """The last training stage of a pipeline recipe (an adviser's ``advice.yaml``) as
    (stage, form values, notes): the form starts from what the adviser recommends."""
    from pathlib import Path


    recipe = yaml.safe_load(Path(path).read_text()) or {}
    stages = [s for s in recipe.get("stages") or [] if isinstance(s, dict) and s.get("stage") in STAGES]
    if not stages:
        raise ValueError(f"{path}: no training stage to launch (the advice is to prompt the base model)")
    st = stages[-1]
    values = flatten({k: v for k, v in st.items() if k not in ("name", "stage")})
    notes = [f"from {path}: stage {st.get('name', st['stage'])!r}"]
    if len(stages) > 1:
        earlier = ", ".join(repr(s.get("name", s["stage"])) for s in stages[:-1])
        notes.append(f"the recipe runs {earlier} first: run it whole with `posttrain pipeline {path}`, or launch "
                     "that stage first and set model to its run")
    return st["stage"], values, notes
