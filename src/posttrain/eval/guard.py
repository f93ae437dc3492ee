"""The forgetting guard: the regression suite every N steps, and a stop + roll-back past a limit.

    evaluator, guard = regression_guard(tokenizer, "regression", every=50, max_drop=0.05)
    Engine(model, stage, data, cfg, evaluators=[evaluator], guard=guard).fit()

The evaluator logs `regression_score` (and its SE) with the run's eval metrics, so the run report
plots it over steps next to the target metric. The reference is `baseline` (the starting
model's score; measure it with `measure(model, tokenizer, suite)` before training), or else the
first score the guard sees. When the score falls more than `max_drop` (0-1 scale) below the
reference, the guard restores the weights of the last evaluation that was within the limit
(kept in memory: the trainable parameters only, so a LoRA run keeps a few MB) and returns the
reason, which stops the engine.

The default guard, on in every stage (`eval.guard: on`), needs no task at all:

    guards = default_guard(cfg, tokenizer, model)   # .evaluators/.guard (regression suite), .drift

`DriftGuard` (eval/drift_guard.py, importable from here too) measures drift from the starting model
and the general-text perplexity change on a time budget; `default_guard` builds it from a run's
`eval.guard*` keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from posttrain.eval.compare import beyond
from posttrain.eval.drift_guard import (DEFAULT_BUDGET, DEFAULT_MAX_DRIFT_KL, DEFAULT_MAX_PPL_CHANGE,
                                        DEFAULT_PROMPTS, DriftGuard, within_budget)
from posttrain.eval.runner import run_suite
from posttrain.eval.suites import load_suite

__all__ = ["measure", "regression_guard", "from_config", "guard_settings", "Guards", "default_guard", "DriftGuard",
           "within_budget", "DEFAULT_BUDGET", "DEFAULT_MAX_DRIFT_KL", "DEFAULT_MAX_PPL_CHANGE", "DEFAULT_PROMPTS"]


def measure(model, tokenizer, suite="regression", *, limit: Optional[int] = None, batch_size: int = 32) -> dict:
    """The suite score {"value", "stderr", "n"} of `model` (eval mode for the call)."""
    was = model.training
    model.eval()
    try:
        return run_suite(model, tokenizer, suite, limit=limit, batch_size=batch_size)["score"]
    finally:
        model.train(was)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def regression_guard(tokenizer, suite="regression", every: int = 1, max_drop: Optional[float] = 0.02,
                     baseline: Optional[float] = None, *, model=None, limit: Optional[int] = None,
                     batch_size: int = 32) -> tuple[Callable, Callable]:
    """(evaluator, guard) for the Engine.

    evaluator(model, step): at steps that are multiples of `every` (`eval.regression_every`), runs the
        suite and returns {"regression_score", "regression_score_stderr", "regression_drop"}; else {}.
    guard(eval_metrics): the stop reason when the drop exceeds `max_drop` (None disables stopping:
        the score is only logged), after restoring the last weights within the limit.
    model: the model about to be trained; its starting weights become the step-0 fallback, so even a
        run that forgets before its first evaluation is rolled back (to the start).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_drop is not None and max_drop <= 0:
        raise ValueError(f"max_drop must be > 0 (a 0-1 score drop), got {max_drop}")
    s = load_suite(suite, limit=limit)  # load (and validate) once, not at every evaluation
    state: dict = {"reference": baseline, "model": model, "good": None, "good_step": None, "history": []}
    if model is not None:
        state["good"], state["good_step"] = _trainable_state(model), 0

    def evaluator(model, step: int) -> dict:
        if step % every:
            return {}
        score = run_suite(model, tokenizer, s, batch_size=batch_size)["score"]
        if state["reference"] is None:
            state["reference"] = score["value"]
        drop = state["reference"] - score["value"]
        state["model"] = model
        state["history"].append((step, score["value"]))
        if max_drop is None or not beyond(drop, max_drop):  # equal to the limit up to rounding is within it
            state["good"], state["good_step"] = _trainable_state(model), step
        return {"regression_score": score["value"], "regression_score_stderr": score["stderr"],
                "regression_drop": drop}

    def guard(metrics: dict) -> Optional[str]:
        if max_drop is None or "regression_drop" not in metrics or not beyond(metrics["regression_drop"], max_drop):
            return None
        reason = (f"forgetting guard: regression score {metrics['regression_score']:.3f} is "
                  f"{metrics['regression_drop']:.3f} below the reference {state['reference']:.3f} "
                  f"(limit {max_drop})")
        if state["good"] is not None:
            with torch.no_grad():
                params = dict(state["model"].named_parameters())
                for n, v in state["good"].items():
                    params[n].copy_(v)
            reason += f"; weights rolled back to step {state['good_step']}"
        else:
            reason += "; no earlier evaluation was within the limit, so nothing was rolled back"
        return reason

    evaluator.state = state  # type: ignore[attr-defined]  (for tests and reports)
    guard.state = state  # type: ignore[attr-defined]
    return evaluator, guard


def from_config(cfg, tokenizer, *, model=None, baseline: Optional[float] = None):
    """(evaluators, guard) for a RunConfig's `eval` section; ([], None) when `eval.regression_every` is unset.

    With `model` (before training) and no `baseline`, the starting model's score is measured
    now and becomes the reference, and its weights the step-0 fallback.
    """
    e = cfg.eval
    if not e.regression_every:
        return [], None
    every_eval = cfg.train.eval_every
    if not every_eval or e.regression_every % every_eval:
        raise ValueError(f"eval.regression_every={e.regression_every} runs at engine evaluations, so it needs "
                         f"train.eval_every set to it or a divisor of it (got {every_eval})")
    if model is not None and baseline is None:
        baseline = measure(model, tokenizer, e.regression_suite)["value"]
    evaluator, guard = regression_guard(tokenizer, e.regression_suite, e.regression_every, e.regression_max_drop,
                                        baseline, model=model)
    return [evaluator], (guard if e.regression_max_drop else None)


# ---------------------------------------------------------------- the default guard of every stage


def guard_settings(cfg) -> dict:
    """The `eval.guard*` settings of a RunConfig (config.EvalConfig); `text` is where the perplexity
    sample comes from: `eval.guard_text`, else `data.mix.data`, else None (the bundled sample)."""
    e, mix = cfg.eval, cfg.data.mix
    return {"on": e.guard == "on", "max_drift_kl": e.guard_max_drift_kl, "max_ppl_change": e.guard_max_ppl_change,
            "budget": e.guard_budget, "n_prompts": e.guard_prompts, "rollback": e.guard_rollback,
            "text": e.guard_text or (mix.data if mix is not None else None)}


@dataclass
class Guards:
    """What `default_guard` builds for a run.

    evaluators, guard: the regression suite's (`from_config`), run at engine evaluations.
    drift: the default-on `DriftGuard`, checked after optimizer steps (`due`, `__call__`, `check`).
    """

    evaluators: list = field(default_factory=list)
    guard: Optional[Callable[[dict], Optional[str]]] = None
    drift: Optional[DriftGuard] = None


def default_guard(cfg, tokenizer, model) -> Guards:
    """The guards every training stage runs: the regression suite when `eval.regression_every` is set,
    and the drift guard unless `eval.guard: off` (or the model is a reward model, with no LM head).

    The drift guard's text sample is `eval.guard_text`, else `data.mix.data` when the run mixes
    general data in, else the bundled paragraphs. Call it with the model about to be trained
    (adapter attached, before any step).
    """
    evaluators, guard = from_config(cfg, tokenizer, model=model)
    s = guard_settings(cfg)
    # a reward model (stage `reward`) has a score head, no next-token distribution to drift
    if not s["on"] or model.get_output_embeddings() is None:
        return Guards(evaluators, guard, None)
    g = DriftGuard(model, tokenizer, text_source=s["text"],
                   max_drift_kl=s["max_drift_kl"], max_ppl_change=s["max_ppl_change"], budget=s["budget"],
                   n_prompts=s["n_prompts"], rollback=s["rollback"])
    return Guards(evaluators, guard, g)
