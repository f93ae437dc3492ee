"""Named measurements a pipeline (and the demo) runs on a model after a stage.

A measurement is `fn(model, tokenizer, **args) -> {column: number}`. Register a new one with
`register_measure("refusal_rate", fn)`, then name it in a recipe's `measures:` list; no pipeline
code changes. Each returns plain floats so lineage.json and the report can show them.
"""

from __future__ import annotations

from typing import Callable, Optional
from posttrain import gym
from posttrain.eval.runner import run_suite
from posttrain.eval.preference import held_out_pref_accuracy
from posttrain.eval.episodes import lookup_success
from posttrain.eval.gym_rates import MEASURES as gym_measures

MEASURES: dict[str, Callable[..., dict]] = {}


def register_measure(name: str, fn: Callable[..., dict]) -> None:
    MEASURES[name] = fn


def run_measure(name: str, model, tokenizer, args: dict, column: Optional[str] = None) -> dict:
    if name not in MEASURES:
        import difflib

        near = difflib.get_close_matches(name, list(MEASURES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown measure '{name}'{hint}; registered: {', '.join(sorted(MEASURES))}")
    try:
        res = MEASURES[name](model, tokenizer, **args)
    except TypeError as e:  # a wrong argument name in the recipe
        raise ValueError(f"measure '{name}': {e}") from None
    if column is not None:
        if len(res) != 1:
            raise ValueError(f"measure '{name}' returns {sorted(res)}; `name:` renames a single column only")
        res = {column: next(iter(res.values()))}
    return {k: round(float(v), 4) for k, v in res.items()}


def task_accuracy(model, tokenizer, *, task: str = "instruct", split: str = "test", n: int = 200) -> dict:
    """Held-out greedy accuracy on a gym chat task (verified answers)."""
    return {f"{task}_accuracy": gym.task_accuracy(model, tokenizer, task=task, split=split, n=n)}


def regression_score(model, tokenizer, *, n: int = 200, split: str = "test") -> dict:
    """The gym's plain-text regression set: general skills a base model already has."""
    return {"regression_score": gym.regression_score(model, tokenizer, n=n, split=split)}


def suite_score(model, tokenizer, *, suite: str = "regression", limit: Optional[int] = None) -> dict:
    """Mean primary metric of an eval suite (posttrain.eval), e.g. the `regression` suite for real models."""
    res = run_suite(model, tokenizer, suite, limit=limit)
    score = res["score"]["value"] if res.get("score") else float("nan")
    return {"regression_score" if suite == "regression" else f"{res['suite']}_score": score}


def preference_accuracy(model, tokenizer, *, beta: float = 0.1, n: int = 200) -> dict:
    """Implicit-reward pairwise accuracy on held-out gym preference pairs (adapter-trained policies)."""
    rows = gym.load_task_rows("preference", "test", n=n)
    return {"preference_accuracy": held_out_pref_accuracy(model, tokenizer, rows, beta=beta)}


for _name, _fn in {"task_accuracy": task_accuracy, "regression_score": regression_score, "suite_score": suite_score,
                   "preference_accuracy": preference_accuracy, "lookup_success": lookup_success}.items():
    register_measure(_name, _fn)


for _name, _fn in gym_measures.items():  # the gym's refusal and tool-call rates
    MEASURES.setdefault(_name, _fn)


def regression(model, tokenizer, kind: Optional[str], n: int) -> dict:
    """The pipeline's regression measurement: `gym` (bundled set) or an eval suite's score."""
    if kind is None:
        return {}
    if kind == "gym":
        return run_measure("regression_score", model, tokenizer, {"n": n})
    return {"regression_score": run_measure("suite_score", model, tokenizer, {"suite": kind, "limit": n})
            .popitem()[1]}
