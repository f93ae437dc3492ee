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

`DriftGuard` measures drift from the starting model (KL per token on its own continuations of
the bundled general prompts) and the general-text perplexity change (`eval/drift.py`), on a
budget: a check runs as soon as the time spent on the guard, its set-up (the base's reference,
built when it is not cached) and this check included, stays within `budget` (10%) of the wall
time so far, so the interval follows the measured cost of a check and the measured step time, and
a stage with slow steps (RL) checks more often in steps, up to `max_checks` (20) a run. A run too short to afford a check within
the budget is not checked (its summary says so). Past a limit it restores the trainable weights of
the last check within the limits (the starting weights if none) and stops the run with a one-line
reason. The engine runs it as a `StepCheck` (`after_step`) after every optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from posttrain.config import EvalConfig
from posttrain.engine.dist import all_reduce_sum, rank
from posttrain.eval import drift as drift_mod
from posttrain.eval import perplexity

from posttrain.eval.compare import beyond
from posttrain.eval.runner import run_suite
from posttrain.eval.suites import load_suite


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


# ---------------------------------------------------------------- the default-on drift guard

# Default limits, chosen from the gym calibration (docs/eval.md, "Calibration"): see the reasons there.
# One source: the config's defaults (config.EvalConfig).
_E = EvalConfig.model_fields
DEFAULT_MAX_DRIFT_KL = _E["guard_max_drift_kl"].default
DEFAULT_MAX_PPL_CHANGE = _E["guard_max_ppl_change"].default
DEFAULT_BUDGET = _E["guard_budget"].default
DEFAULT_PROMPTS = _E["guard_prompts"].default


def within_budget(spent_s: float, check_s: float, train_s: float, budget: float) -> bool:
    """Whether one more check of `check_s` seconds keeps all checks within `budget` of the wall time:
    (spent + check) <= budget * (train + spent + check). With steps of `t` seconds this runs a check
    every ceil(check_s * (1 - budget) / (budget * t)) steps or so: 9 steps of 1 s for a 1-s check at 10%."""
    return spent_s + check_s <= budget * (train_s + spent_s + check_s)


def _restore(model, state: dict) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


class DriftGuard:
    """Drift and general-text perplexity checks on a time budget, with stop and roll-back past a limit.

    The engine calls `after_step` after every optimizer step (an `engine.trainer.StepCheck`): when
    `due(step, total_steps)`, it measures (`guard(model, step)`, model in eval mode) and returns the
    metrics and `check(metrics)`, None or the one-line stop reason (the weights are rolled back then).

    max_drift_kl: limit on `drift_kl` (nats per token, KL(start ‖ now)); None: only logged.
    max_ppl_change: limit on `general_ppl_change` (relative, 0.25 = 25% higher perplexity); None: only logged.
    budget: the share of the wall time the guard may take (0.10), its set-up included: building the
        base's reference (generation; cached per base model) and the general-text perplexity, and the
        timed check of the starting model. A check, the last step's included, runs only within it.
    rollback: keep (on the CPU) the trainable weights of the last check within the limits and restore
        them when a limit is crossed; with False the run only stops.
    max_checks: at most this many checks per run (one every total_steps / max_checks steps, and the last
        step's): a run with slow steps (RL) would otherwise spend its whole budget on checks that
        tell nothing new (a 160-step GRPO run made 109 checks, 9.2% of its time; with 20, about 2%).
    """

    def __init__(self, model, tokenizer, *, text_source=None, max_drift_kl: Optional[float] = DEFAULT_MAX_DRIFT_KL,
                 max_ppl_change: Optional[float] = DEFAULT_MAX_PPL_CHANGE, budget: float = DEFAULT_BUDGET,
                 n_prompts: Optional[int] = DEFAULT_PROMPTS, max_new_tokens: int = 32, n_text: int = 64,
                 batch_size: int = 16, rollback: bool = True, max_checks: int = 20,
                 clock: Callable[[], float] = time.perf_counter):
        for name, v in (("max_drift_kl", max_drift_kl), ("max_ppl_change", max_ppl_change)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or None to only log), got {v}")
        if not 0 < budget < 1:
            raise ValueError(f"budget must be in (0, 1) (a share of the training time), got {budget}")
        self.max_drift_kl, self.max_ppl_change, self.budget = max_drift_kl, max_ppl_change, budget
        self.rollback, self.batch_size, self.clock, self.max_checks = rollback, batch_size, clock, max_checks
        self.pad_id = drift_mod._pad_id(tokenizer)
        t0 = clock()
        self.drift_ref = drift_mod.build_drift_reference(model, tokenizer, n_prompts=n_prompts,
                                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.text_ref = perplexity.text_reference(model, tokenizer, text_source, n=n_text, batch_size=batch_size)
        self.setup_s = clock() - t0  # the reference's generation when it was not cached
        # snapshots and roll-back go through the model given here: a DDP wrapper the engine calls the
        # guard with shares its parameters but prefixes their names with "module."
        self.model = model
        self.good = self._snapshot() if rollback else None
        self.good_step = 0
        self.history: list[dict] = []
        # the starting model's check: its cost sets the cadence (and its drift is 0 unless the
        # model already differs from its base, e.g. a run that continues an adapter)
        t1 = clock()
        self.start = self._measure(model)
        self.check_s = clock() - t1
        self.spent_s = self.setup_s + self.check_s  # the set-up counts against the budget too
        self.train_s = 0.0
        self._last = clock()

    def _measure(self, model) -> dict:
        was = model.training
        model.eval()
        try:
            d = drift_mod.drift(model, self.drift_ref, batch_size=self.batch_size, pad_id=self.pad_id)
            p = perplexity.perplexity_change(model, self.text_ref, batch_size=self.batch_size, pad_id=self.pad_id)
        finally:
            model.train(was)
        return {"drift_kl": d["drift_kl"], "drift_kl_stderr": d["drift_kl_stderr"], **p}

    name = "guard"  # the run's result["guard"] is its summary()
    split = "eval"  # its metrics are logged with the run's evaluations (the report plots them)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a check runs after `step`: the time since the last call counts as training time,
        and a check is due when the guard's total would stay within `budget` of all the time spent.
        Under several processes rank 0's clock decides for all (a check is a collective under FSDP)."""
        now = self.clock()
        self.train_s += now - self._last
        self._last = now
        last = self.history[-1]["step"] if self.history else 0
        spaced = not total_steps or step >= total_steps or step - last >= total_steps / self.max_checks
        d = spaced and within_budget(self.spent_s, self.check_s, self.train_s, self.budget)
        return bool(all_reduce_sum(torch.tensor(int(d) if rank() == 0 else 0)).item())

    def after_step(self, model, step: int, total_steps: int, metrics: dict) -> tuple[dict, Optional[str]]:
        """The engine's hook: ({}, None) between checks; (the check's metrics, stop reason or None) at one."""
        if not self.due(step, total_steps):
            return {}, None
        m = self(model, step)
        return m, self.check(m)

    def state_dict(self) -> dict:
        """The time accounting and the checks so far. The last good weights are not checkpointed (a
        copy of the weights); after a resume the roll-back target is the starting weights until a
        check passes again."""
        return {"spent_s": self.spent_s, "train_s": self.train_s, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        # this process's own set-up (the reference from the cache, the start check) is already in spent_s
        self.spent_s += float(state.get("spent_s", 0.0))
        self.train_s += float(state.get("train_s", 0.0))
        self.history = list(state.get("history", [])) + self.history

    def __call__(self, model, step: int) -> dict:
        t0 = self.clock()
        m = self._measure(model)
        self.check_s = self.clock() - t0
        self.spent_s += self.check_s
        self._last = self.clock()  # the check's own time is not training time
        m["guard_time_share"] = self.spent_s / max(self.train_s + self.spent_s, 1e-9)
        if self._reason(m) is None:
            self.good_step = step
            if self.rollback:
                self.good = self._snapshot()
        self.history.append({"step": step, **m})
        return m

    def _snapshot(self) -> dict:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def _reason(self, m: dict) -> Optional[str]:
        # limits apply to the change since the start: a run that continues an adapter starts with
        # some drift from the base already, and only what this run adds is held against it
        over = []
        kl = m.get("drift_kl", 0.0) - self.start["drift_kl"]
        ppl = m.get("general_ppl_change", 0.0) - self.start["general_ppl_change"]
        if self.max_drift_kl is not None and kl > self.max_drift_kl:
            over.append(f"drift from the base {m['drift_kl']:.3f} nats/token > limit {self.max_drift_kl}")
        if self.max_ppl_change is not None and ppl > self.max_ppl_change:
            over.append(f"general-text perplexity {m['general_ppl_change']:+.1%} vs the base > limit "
                        f"+{self.max_ppl_change:.0%}")
        return "; ".join(over) or None

    def check(self, metrics: dict) -> Optional[str]:
        """The stop reason when a limit is crossed (after rolling back), else None."""
        over = self._reason(metrics)
        if over is None:
            return None
        reason = f"forgetting guard: {over}"
        if self.rollback and self.good is not None:
            _restore(self.model, self.good)
            reason += f"; weights rolled back to step {self.good_step}"
        return reason + " (eval.guard: off disables it)"

    def summary(self) -> dict:
        """For the run's result: limits, checks, time share, and the last check's numbers (the start's
        when the run was too short for a check within the budget; `note` says so)."""
        last = self.history[-1] if self.history else self.start
        out = {"max_drift_kl": self.max_drift_kl, "max_ppl_change": self.max_ppl_change, "checks": len(self.history),
               "last_check_step": last.get("step", 0), "good_step": self.good_step,
               "check_s": round(self.check_s, 3), "setup_s": round(self.setup_s, 3),
               "time_share": round(self.spent_s / max(self.train_s + self.spent_s, 1e-9), 4),
               "drift_kl": last["drift_kl"], "general_ppl_change": last["general_ppl_change"],
               "text_source": self.text_ref.source}
        if not self.history:
            out["note"] = (f"no check after the start: the run ({self.train_s:.1f} s of training) was too short for a "
                           f"check of {self.check_s:.2f} s within {self.budget:.0%} of its time, set-up "
                           f"({self.setup_s:.2f} s) included")
        return out


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
