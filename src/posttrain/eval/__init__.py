"""Evaluation: tasks as data, the built-in `gym` and `regression` suites, base-vs-tuned comparison,
the forgetting guard, and an lm-evaluation-harness adapter. See docs/eval.md.

    from posttrain.eval import evaluate, run_suite
    evaluate("runs/sft", suite="regression", baseline=gym.base_model_path(), out="eval-out")

Imports are lazy: this package is imported by the lm-eval import hook at interpreter start-up,
which must not pull in torch.
"""

from __future__ import annotations

_LAZY = {
    "evaluate": "posttrain.eval.runner", "run_suite": "posttrain.eval.runner", "compare": "posttrain.eval.compare",
    "load_task": "posttrain.eval.tasks", "load_suite": "posttrain.eval.suites",
    "regression_guard": "posttrain.eval.guard",
    "is_refusal": "posttrain.data.refusal", "Task": "posttrain.eval.tasks", "TaskError": "posttrain.eval.tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'posttrain.eval' has no attribute {name!r}")
