"""Tasks are data: a YAML file that names a task kind and points to JSONL rows.

    name: capitals-mc
    kind: multiple_choice        # multiple_choice | generate | perplexity | ifeval | refusal | tool_call
    data: capitals.jsonl         # relative to this YAML file
    format: text                 # text: prompts as given; chat: through the tokenizer's chat template

See docs/eval.md for every key and the row fields each kind reads. Loading validates the file
and every row up front, so a bad task fails before any model runs, with the file and line named.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from posttrain.data.sources import DataError, read_records
from posttrain.data.tools import render_prompt

KINDS = ("multiple_choice", "generate", "perplexity", "ifeval", "refusal", "tool_call")

# primary metric (the one a suite score averages) and whether higher is better
PRIMARY = {"multiple_choice": "acc_norm", "generate": "exact_match", "perplexity": "bits_per_byte",
           "ifeval": "prompt_strict", "refusal": "accuracy", "tool_call": "accuracy"}

_KEYS = {"name", "kind", "data", "format", "description", "limit", "primary", "in_score",
         "trust_code",  # read by eval.suites before anything is imported: a lone task file's own consent
         # generate
         "scorer", "target_field", "pattern", "verifier", "max_new_tokens", "stop",
         # refusal
         "detector"}
SCORERS = ("exact", "regex", "verifier")


class TaskError(DataError):
    """A task file or row that cannot be used; the message names the file (and line) and the key."""


@dataclass
class Task:
    name: str
    kind: str
    rows: list[dict]
    path: Optional[Path] = None
    format: str = "text"
    primary: str = ""
    in_score: Optional[bool] = None  # default: every kind but perplexity (not a 0-1 rate)
    scorer: str = "exact"
    target_field: str = "answer"
    pattern: Optional[str] = None
    verifier: Optional[str] = None
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    detector: Optional[str] = None
    description: str = ""

    def __post_init__(self):
        if not self.primary:
            self.primary = "accuracy" if self.kind == "generate" and self.scorer == "verifier" else PRIMARY[self.kind]

    @property
    def scored(self) -> bool:
        return self.kind != "perplexity" if self.in_score is None else bool(self.in_score)

    def settings(self) -> dict:
        """What decides the scores besides the model: recorded in results.json."""
        keys = ("kind", "format", "primary", "scorer", "target_field", "pattern", "verifier", "max_new_tokens",
                "stop", "detector")
        return {k: getattr(self, k) for k in keys}


def resolve_callable(name: str, where: str) -> Callable:
    """`package.module:function` (or `package.module.function`) -> the function."""
    mod, sep, attr = name.partition(":")
    if not sep:
        mod, _, attr = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise TaskError(f"{where}: cannot import {name!r} ({e}); write it as 'package.module:function'") from None
    if not callable(fn):
        raise TaskError(f"{where}: {name!r} is not callable")
    return fn


def read_jsonl(path: Path) -> list[dict]:
    """A task's rows, read by the data reader (`posttrain.data.sources`): the same errors, naming file and line.

    Each row gets `_origin` (``capitals.jsonl line 3``: the file's name, as results show it).
    """
    if not path.is_file():
        raise TaskError(f"task data not found: {path}")
    try:
        records = read_records(path)
    except DataError as e:
        raise TaskError(str(e)) from None
    return [{**r.data, "_origin": r.data.get("_origin", path.name + r.origin[len(str(path)):])} for r in records]


def _has_prompt(row: dict) -> bool:
    return isinstance(row.get("prompt"), (str, list)) or isinstance(row.get("messages"), list)


def _check_row(task: Task, row: dict, i: int) -> None:
    where = row.get("_origin", f"row {i}")
    need = []
    if task.kind == "perplexity":
        if not isinstance(row.get("text"), str):
            need.append("'text' (a string)")
    else:
        if not _has_prompt(row):
            need.append("'prompt' (a string) or 'messages' (a list of turns)")
        if task.kind == "multiple_choice":
            ch = row.get("choices")
            if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) for c in ch)):
                need.append("'choices' (a list of at least 2 strings)")
            elif not (isinstance(row.get("label"), int) and 0 <= row["label"] < len(ch)):
                need.append(f"'label' (an index into choices, 0-{len(ch) - 1})")
        elif task.kind == "generate" and task.scorer != "verifier" and task.target_field not in row:
            need.append(f"'{task.target_field}' (the target; a string or a list of accepted strings)")
        elif task.kind == "ifeval" and not isinstance(row.get("instructions"), list):
            need.append("'instructions' (a list of {'type': ..., args})")
        elif task.kind == "refusal" and not isinstance(row.get("harmful"), bool):
            need.append("'harmful' (true or false)")
        elif task.kind == "tool_call" and not isinstance(row.get("tools"), list):
            need.append("'tools' (the offered OpenAI-style tool schemas)")
    if need:
        raise TaskError(f"{where}: task '{task.name}' ({task.kind}) needs " + " and ".join(need))


def make_task(spec: dict, rows: list[dict], *, path: Optional[Path] = None) -> Task:
    """A validated Task from a YAML mapping `spec` and its rows."""
    where = str(path) if path else f"task {spec.get('name', '?')}"
    unknown = set(spec) - _KEYS
    if unknown:
        k = sorted(unknown)[0]
        near = difflib.get_close_matches(k, sorted(_KEYS), n=1)
        raise TaskError(f"{where}: unknown key '{k}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    kind = spec.get("kind")
    if kind not in KINDS:
        near = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise TaskError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}{hint}")
    fmt = spec.get("format", "text")
    if fmt not in ("text", "chat"):
        raise TaskError(f"{where}: format must be 'text' or 'chat', got {fmt!r}")
    scorer = spec.get("scorer", "exact")
    if scorer not in SCORERS:
        raise TaskError(f"{where}: scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if scorer == "regex" and not spec.get("pattern"):
        raise TaskError(f"{where}: scorer 'regex' needs 'pattern' (a regex; its first group is the answer)")
    if scorer == "verifier" and not spec.get("verifier"):
        raise TaskError(f"{where}: scorer 'verifier' needs 'verifier' (e.g. 'mypkg.checks:is_right')")
    stop = spec.get("stop") or []
    task = Task(name=str(spec.get("name") or (path.stem if path else "task")), kind=kind, rows=rows, path=path,
                format=fmt, primary=spec.get("primary", ""), in_score=spec.get("in_score"),
                scorer=scorer, target_field=spec.get("target_field", "answer"), pattern=spec.get("pattern"),
                verifier=spec.get("verifier"), max_new_tokens=int(spec.get("max_new_tokens", 32)),
                stop=[stop] if isinstance(stop, str) else list(stop), detector=spec.get("detector"),
                description=spec.get("description", ""))
    if spec.get("limit"):
        task.rows = task.rows[: int(spec["limit"])]
    for i, row in enumerate(task.rows):
        _check_row(task, row, i)
    for name, what in ((task.verifier, "verifier"), (task.detector, "detector")):
        if name:
            resolve_callable(name, f"{where}: {what}")
    return task


def load_task(path: Union[str, Path]) -> Task:
    """Read a task YAML file and its JSONL rows (path relative to the YAML file)."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"task file not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{p}: the top level must be a mapping")
    data = spec.pop("data", None)
    if not data:
        raise TaskError(f"{p}: 'data' (a JSONL file, relative to the YAML file) is required")
    rows = read_jsonl((p.parent / data).resolve())
    return make_task(spec, rows, path=p)


def prompt_of(task: Task, row: dict, tokenizer) -> str:
    """The text the model continues: raw for `format: text`, the chat template's rendering for `chat`.

    `messages` that end with an assistant turn (the reference answer) are cut before it.
    """
    if task.format == "text":
        p = row.get("prompt")
        if not isinstance(p, str):
            raise TaskError(f"{row.get('_origin', 'row')}: format 'text' needs a string 'prompt'")
        return p
    if getattr(tokenizer, "chat_template", None) is None:
        raise TaskError(f"task '{task.name}' uses format 'chat' but the tokenizer has no chat template")
    msgs: Any = row.get("messages")
    if msgs is None:
        p = row["prompt"]
        msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]

    return render_prompt(tokenizer, msgs, row.get("tools"))
