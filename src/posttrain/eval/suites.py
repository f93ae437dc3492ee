"""Suites: named lists of tasks. Built-in: `gym` (the target tasks) and `regression` (general skills).

A suite is a YAML file `{name, description, tasks: [task.yaml, ...], trust_code}` (paths relative
to it). `load_suite(spec)` accepts a built-in name, a suite YAML, a single task YAML, or
`lm_eval:TASK[@N][,TASK[@N]...]`: tasks of lm-evaluation-harness, each run by lm-eval itself on the
model (`LmEvalTask`, `harness.run_lm_eval_task`), so `posttrain eval --suite` and the forgetting
guard's `eval.regression_suite` take them like any other suite.

A task's `verifier` or `detector` names a Python function (`package.module:function`) that is
imported and run on model output, outside the code sandbox. Suites are shared files, so a hook
other than the built-in ones (`BUILTIN_HOOKS`) is refused, before anything is imported, unless the
file the user loads (the suite, or the lone task YAML) says `trust_code: true`.

The built-in suites' JSONL files are exported from the gym's held-out *test* split and shipped
in the package (so they work offline and never change under a user); `build_builtin()`
regenerates them deterministically, and a test checks the shipped files still equal its output.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Optional, Union

import yaml

from posttrain.eval.kinds import is_refusal
from posttrain.eval.tasks import Task, TaskError, load_task
from posttrain.gym import verify
from posttrain.gym.facts import FACT_KINDS, make_fact, sample_rows, split_of
from posttrain.gym.world import WORDS, countries
from posttrain.gym.corpus import declare
from posttrain import gym

SUITES_DIR = Path(__file__).resolve().parent / "suites"
BUILTIN = ("gym", "regression")
LM_EVAL = "lm_eval:"


@dataclass
class Suite:
    name: str
    tasks: list[Task]
    path: Path | None = None
    description: str = ""


def load_suite(spec: Union[str, Path, Suite], *, limit: int | None = None) -> Suite:
    """A Suite from a built-in name, a suite YAML or a task YAML; `limit` keeps the first N rows per task."""
    if isinstance(spec, Suite):
        suite = spec
    elif str(spec).startswith(LM_EVAL):
        suite = lm_eval_suite(str(spec))
    else:
        s = str(spec)
        p = SUITES_DIR / f"{s}.yaml" if s in BUILTIN else Path(s)
        if not p.is_file():
            import difflib

            near = difflib.get_close_matches(s, BUILTIN, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise TaskError(f"suite not found: {s!r}{hint}; give a built-in name ({', '.join(BUILTIN)}), "
                            "a suite YAML or a task YAML")
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise TaskError(f"{p}: not valid YAML: {e}") from None
        if isinstance(doc, dict) and "kind" in doc:
            _check_hooks(p, doc, p, _trusted(doc, p))
            suite = Suite(p.stem, [load_task(p)], p)
        elif isinstance(doc, dict) and isinstance(doc.get("tasks"), list) and doc["tasks"]:
            trusted = _trusted(doc, p)
            for t in doc["tasks"]:
                if isinstance(t, str):  # anything else is load_task's error to report
                    _check_hooks(p.parent / t, _read_spec(p.parent / t), p, trusted)
            suite = Suite(str(doc.get("name") or p.stem), [load_task(p.parent / t) for t in doc["tasks"]], p,
                          str(doc.get("description", "")))
        else:
            raise TaskError(f"{p}: a suite needs 'tasks' (a list of task YAML files); a task needs 'kind'")
    names = [t.name for t in suite.tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TaskError(f"suite {suite.name}: task names must be unique, repeated: {sorted(dup)}")
    if limit:
        for t in suite.tasks:
            t.rows = t.rows[:limit]
            if isinstance(t, LmEvalTask):
                t.limit = min(t.limit or limit, limit)
    return suite


@dataclass
class LmEvalTask(Task):
    """A task of lm-evaluation-harness: lm-eval builds its requests and computes its metrics, and
    posttrain's scoring functions answer the requests (`harness.PosttrainLM`), so the numbers are
    those of lm-eval's own `simple_evaluate` on the same model.

    lm_eval_task: the task's name in lm-eval's registry (or in `include_path`).
    limit: the first N documents (lm-eval's `--limit`); None: all.
    include_path: the folder of a local task YAML; only it is indexed, not lm-eval's built-in tasks.
    """

    lm_eval_task: str = ""
    limit: Optional[int] = None
    include_path: Optional[str] = None

    def __post_init__(self):
        pass  # the primary metric is known once lm-eval has run the task (see harness.run_lm_eval_task)

    def run(self, model, tokenizer, *, batch_size: int = 32) -> dict:
        """This task on an in-memory model, as `kinds.run_task` returns it (lm-eval's metric names)."""
        # lm-eval is an optional dependency (`pip install lm-eval`), imported only when its tasks run
        from posttrain.eval.harness import run_lm_eval_task

        return run_lm_eval_task(self, model, tokenizer, batch_size=batch_size)


def lm_eval_suite(spec: str) -> Suite:
    """`lm_eval:TASK[@N][,TASK[@N]...]`: TASK is a task name of lm-eval's registry (`arc_easy`) or a
    local lm-eval task YAML (`tasks/my_task.yaml`, whose `task:` names it); `@N` keeps its first N documents."""
    if find_spec("lm_eval") is None:
        raise TaskError(f"suite {spec!r}: lm-evaluation-harness is not installed: pip install lm-eval")
    items = [x.strip() for x in spec[len(LM_EVAL):].split(",") if x.strip()]
    if not items:
        raise TaskError(f"suite {spec!r}: name at least one lm-eval task: lm_eval:TASK[@N][,TASK[@N]...]")
    tasks = []
    for item in items:
        name, limit, include = item, None, None
        if "@" in item:
            name, _, n = item.rpartition("@")
            if not n.isdigit() or int(n) < 1:
                raise TaskError(f"suite {spec!r}: {item!r}: the limit after '@' must be a whole number >= 1, got {n!r}")
            limit = int(n)
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise TaskError(f"suite {spec!r}: lm-eval task file not found: {name}")
            task_name = _read_spec(path).get("task")
            if not isinstance(task_name, str) or not task_name:
                raise TaskError(f"{path}: an lm-eval task YAML needs 'task: NAME' (suite {spec!r})")
            name, include = task_name, str(path.resolve().parent)
        tasks.append(LmEvalTask(name, "lm_eval", [], lm_eval_task=name, limit=limit, include_path=include,
                                description=f"lm-evaluation-harness task {name}"))
    return Suite(spec, tasks, None, "lm-evaluation-harness tasks")


def _trusted(doc: dict, path: Path) -> bool:
    trust = doc.get("trust_code", False)
    if not isinstance(trust, bool):
        raise TaskError(f"{path}: trust_code must be true or false, got {trust!r}")
    return trust


def _read_spec(path: Path) -> dict:
    """A task YAML as data (safe_load: nothing runs); what cannot be read is left for load_task to report."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _hook_name(name: str) -> str:
    """`pkg.mod:fn` or `pkg.mod.fn` -> `pkg.mod:fn`, as resolve_callable reads them."""
    if ":" in name:
        return name
    module, _, function = name.rpartition(".")
    return f"{module}:{function}"


def _check_hooks(task_path: Path, spec: dict, suite_path: Path, trusted: bool) -> None:
    """Refuse a task's non-built-in hooks unless the loaded file says trust_code: true (nothing is imported)."""
    if trusted:
        return
    for key in ("verifier", "detector"):
        name = spec.get(key)
        if name and _hook_name(str(name)) not in BUILTIN_HOOKS:
            where = suite_path if task_path == suite_path else f"{suite_path}: task {task_path.name}"
            raise TaskError(f"{where}: {key} {name!r} is code that would run on this machine; add "
                            f"'trust_code: true' to {suite_path.name} if you trust its source "
                            f"(built-in hooks need nothing: {', '.join(sorted(BUILTIN_HOOKS))})")


def gym_verify(row: dict, completion: str) -> bool:
    """Verifier for rows exported from the gym: applies the rule the row names in `check`."""
    return verify("gym", row, completion)


# ------------------------------------------------------------------ building the shipped data

# (file, gym task, rows): the gym half of the built-in data
_GYM_EXPORTS = (("gym-instruct", "instruct", 200), ("gym-reasoning", "reasoning", 100),
                ("gym-refusal", "refusal", 200), ("gym-tools", "tools", 200), ("regression-gen", "regression", 200))


MC_KINDS = ("capital", "currency", "reverse", "upper", "add", "mul")


# the hooks that ship with posttrain, named from the functions themselves so a move cannot stale them
BUILTIN_HOOKS = frozenset(f"{f.__module__}:{f.__qualname__}" for f in (gym_verify, is_refusal))


def _mc_rows(per_kind: int) -> list[dict]:
    """Plain-text multiple choice on test-split facts, up to `per_kind` rows of each kind in MC_KINDS
    (fewer where the test split has fewer distinct facts, e.g. capitals), 4 choices each."""
    def distractors(fact, rng):
        if fact.kind in ("capital", "currency"):
            pool = {getattr(x, fact.kind) for x in countries()}
        elif fact.kind == "reverse":
            pool = {w[::-1] for w in WORDS}
        elif fact.kind == "upper":
            pool = {w.upper() for w in WORDS}
        else:
            ans = int(fact.answer)
            pool = {str(ans + d) for d in (-10, -2, -1, 1, 2, 10) if ans + d >= 0}
        return rng.sample(sorted(pool - {fact.answer}), 3)

    prompts = {"capital": "The capital of {c} is", "currency": "The currency of {c} is the",
               "reverse": "The word {w} reversed is", "upper": "The word {w} in capital letters is",
               "add": "{a} + {b} =", "mul": "{a} * {b} ="}
    by_kind = []
    for kind in MC_KINDS:
        rng = random.Random(f"eval-mc:{kind}")
        rows, seen = [], set()
        for _ in range(20_000):
            if len(rows) == per_kind:
                break
            fact = make_fact(kind, rng)
            if split_of(fact.key) != "test" or fact.key in seen:
                continue
            seen.add(fact.key)
            choices = distractors(fact, rng) + [fact.answer]
            rng.shuffle(choices)
            rows.append({"prompt": prompts[kind].format(**fact.args), "choices": [" " + c for c in choices],
                         "label": choices.index(fact.answer), "kind": kind})
        by_kind.append(rows)
    return [r for group in zip(*by_kind) for r in group] + [r for g in by_kind for r in g[min(map(len, by_kind)):]]


def _ppl_rows(n: int) -> list[dict]:
    """Held-out plain text: declarative sentences about test-split facts, in the corpus's style."""
    kinds = [k for k in FACT_KINDS if k != "json"]

    def make(rng: random.Random):
        facts = []
        while len(facts) < 4:
            f = make_fact(rng.choice(kinds), rng)
            if not facts or f.key != facts[0].key:
                facts.append(f)
        text = "\n".join(declare(f, rng) for f in facts)
        return facts[0].key, text, {"text": text}

    return sample_rows(make, "test", n, 0, "eval-ppl")


def build_builtin(out_dir: Union[str, Path] = SUITES_DIR) -> list[Path]:
    """Write the built-in suites' JSONL files (deterministic); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    data = {name: gym.load_task_rows(task, "test", n=n) for name, task, n in _GYM_EXPORTS}
    data["regression-mc"] = _mc_rows(25)
    data["regression-ppl"] = _ppl_rows(50)
    for name, rows in data.items():
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written.append(p)
    return written


if __name__ == "__main__":
    for path in build_builtin():
        print(path)
