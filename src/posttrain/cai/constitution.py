"""A constitution (the principles) and the prompt templates of the critique, revision and comparison steps.

Constitution files:
- YAML: a list of principles, or `{principles: [...]}`; a principle is a string, or a mapping
  `{id, text, critique, revision}` whose own critique/revision requests replace the templates'
  (as in Bai et al. 2022, where each principle is a critique request and a revision request);
- text: one principle per line; blank lines and `#` comments skipped, `-`, `*`, `1.` bullets stripped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import yaml


class ConstitutionError(ValueError):
    pass


@dataclass(frozen=True)
class Principle:
    id: str
    text: str
    critique: Optional[str] = None  # this principle's own critique request (a template)
    revision: Optional[str] = None  # and its own revision request


def load_constitution(src: Union[str, Path, list]) -> list[Principle]:
    if isinstance(src, list):
        items, where = src, "constitution"
    else:
        p = Path(src)
        if not p.is_file():
            raise ConstitutionError(f"constitution not found: {p}")
        where = str(p)
        if p.suffix in (".yaml", ".yml"):
            try:
                items = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise ConstitutionError(f"{p}: not valid YAML: {e}") from None
            if isinstance(items, dict):
                extra = set(items) - {"principles"}
                if extra:
                    raise ConstitutionError(f"{p}: unknown top-level key(s) {sorted(extra)}; expected `principles`")
                items = items.get("principles")
        else:
            items = [re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", line).strip() for line in p.read_text().splitlines()]
            items = [t for t in items if t and not t.startswith("#")]
    if not isinstance(items, list) or not items:
        raise ConstitutionError(f"{where}: expected a non-empty list of principles")
    out = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            it = {"text": it}
        if not isinstance(it, dict) or not str(it.get("text", "")).strip():
            raise ConstitutionError(f"{where}: principle {i} must be a string or a mapping with `text`")
        extra = set(it) - {"id", "text", "critique", "revision"}
        if extra:
            k = sorted(extra)[0]
            near = difflib.get_close_matches(k, ["id", "text", "critique", "revision"], n=1)
            raise ConstitutionError(f"{where}: principle {i}: unknown key '{k}'"
                                    + (f" (did you mean '{near[0]}'?)" if near else ""))
        out.append(Principle(id=str(it.get("id", f"p{i}")), text=str(it["text"]).strip(),
                             critique=it.get("critique"), revision=it.get("revision")))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise ConstitutionError(f"{where}: principle ids must be unique, got {ids}")
    return out


# The default prompts. Each is a str.format template; the fields each may use are in FIELDS.
DEFAULT_TEMPLATES = {
    "critique": "Critique your last answer against this principle: {principle} "
                "Say briefly what in it goes against the principle, if anything.",
    "revision": "Rewrite your answer so that it follows the principle: {principle} "
                "Reply with the rewritten answer only.",
    "compare": "Which answer to the question follows the principle better?\nPrinciple: {principle}\n"
               "Question: {prompt}\n(A) {a}\n(B) {b}\nReply with A or B.",
    # text the comparison's answer starts with; the choice tokens are scored right after it
    "compare_prefix": "The better answer is",
    "choices": [" A", " B"],
}
FIELDS = {"critique": {"principle", "prompt", "response"},
          "revision": {"principle", "prompt", "response", "critique"},
          "compare": {"principle", "prompt", "a", "b"},
          "compare_prefix": {"principle"}}


def load_templates(src: Union[None, str, Path, dict] = None) -> dict:
    """The default templates, with those in `src` (a YAML file or a dict) replacing them; checked."""
    if src is None:
        over = {}
    elif isinstance(src, dict):
        over = dict(src)
    else:
        p = Path(src)
        if not p.is_file():
            raise ConstitutionError(f"templates file not found: {p}")
        over = yaml.safe_load(p.read_text()) or {}
        if not isinstance(over, dict):
            raise ConstitutionError(f"{p}: templates must be a mapping of {sorted(DEFAULT_TEMPLATES)}")
    for k in over:
        if k not in DEFAULT_TEMPLATES:
            near = difflib.get_close_matches(k, list(DEFAULT_TEMPLATES), n=1)
            raise ConstitutionError(f"unknown template '{k}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                                    + f"; templates: {', '.join(DEFAULT_TEMPLATES)}")
    t = {**DEFAULT_TEMPLATES, **over}
    for name, allowed in FIELDS.items():
        check_fields(f"template '{name}'", t[name], allowed)
    ch = t["choices"]
    if not (isinstance(ch, list) and len(ch) == 2 and all(isinstance(c, str) and c for c in ch) and ch[0] != ch[1]):
        raise ConstitutionError(f"template 'choices' must be two different non-empty strings, got {ch!r}")
    return t


def check_fields(what: str, template: str, allowed: set) -> None:
    if not isinstance(template, str):
        raise ConstitutionError(f"{what} must be a string, got {type(template).__name__}")
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    bad = used - allowed
    if bad:
        raise ConstitutionError(f"{what} uses unknown field(s) {sorted(bad)}; it may use {sorted(allowed)}")


def templates_id(t: dict) -> str:
    return hashlib.sha256(json.dumps(t, sort_keys=True).encode()).hexdigest()[:12]


def principle_dict(p: Principle) -> dict:
    return {k: v for k, v in asdict(p).items() if v is not None}
