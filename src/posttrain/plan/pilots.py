"""Pilots: short real trainings of each candidate method at equal compute, scored on held-out examples
as they train, their learning curves extrapolated to the full run, and the forgetting each caused.

    pilots = run_pilots(cfg, plans, full_steps, minutes=5, out_dir=Path("advice/pilots"))
    pilots["lora"]["expected_score"], pilots["lora"]["uncertainty"]

Equal compute: every method gets the same `minutes` of the planner's predicted step time on the
budget's device (on the CPU, the calibrated CPU time of one core), so a cheap method takes more
steps than an expensive one. Each pilot is a real `posttrain sft` run (`cpt` then `sft` for
continued pretraining then SFT) whose evaluator scores `PILOT_POINTS` times on the held-out rows.
A pilot is the first steps of the full run, learning-rate schedule included: it trains on the full
run's schedule (`train.schedule_steps`, the full run's steps) and stops at its own step count, so its
curve is the full run's curve cut short, not a shorter run that anneals early.

The learning curve (docs/advise.md, "Pilots"): the held-out error after t optimizer steps follows a
power law, err(t) = A * t^-alpha with alpha >= 0 (Hestness et al. 2017, "Deep Learning Scaling is
Predictable, Empirically"; Kaplan et al. 2020), fitted by least squares in log-log space on the
pilot's points and read at the full run's step count. The uncertainty is the spread of that
prediction over a bootstrap of the held-out examples (the same examples rescored at every point,
resampled together), added in quadrature to the binomial noise of the full run's own score on the
same number of examples.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

PILOT_POINTS = 5  # held-out evaluations per pilot (the points the curve is fitted on)
BOOTSTRAP = 200  # resamples of the held-out examples for the uncertainty
MIN_ERROR_SHARE = 0.5  # an error of 0 is counted as half an example: log(0) has no fit
PILOT_ADAPTERS = {"prompt_tuning": "prompt", "prefix_tuning": "prefix", "lora": "lora", "qlora": "qlora",
                  "full": "none", "cpt+sft": "lora"}


# ---------------------------------------------------------------- the learning curve


def _fit_log_log(steps: Sequence[int], errors: Sequence[float]) -> tuple[float, float]:
    """(log A, alpha) of err = A t^-alpha, least squares on log err against log t, alpha >= 0."""
    x = [math.log(s) for s in steps]
    y = [math.log(e) for e in errors]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else 0.0
    if slope > 0:  # the error grew: no learning to extrapolate, keep the mean level
        return my, 0.0
    return my - slope * mx, -slope


def _predict(steps: Sequence[int], correct: Sequence[Sequence[bool]], target: int, n: int) -> float:
    floor = MIN_ERROR_SHARE / n
    errors = [max(floor, 1.0 - sum(c) / n) for c in correct]
    log_a, alpha = _fit_log_log(steps, errors)
    return min(1.0, max(0.0, 1.0 - math.exp(log_a) * target ** -alpha))


def extrapolate(steps: Sequence[int], correct: Sequence[Sequence[bool]], target: int, *, seed: int = 0) -> dict:
    """The expected held-out score at `target` steps from per-example correctness at `steps`.

    `correct[i][j]`: example j right after steps[i] optimizer steps (the same examples at every
    point). Returns {"expected_score", "uncertainty", "alpha", "points"}.
    """
    if not steps or len(steps) != len(correct):
        raise ValueError("extrapolate needs one list of per-example results per step")
    n = len(correct[0])
    expected = _predict(steps, correct, target, n)
    rng = random.Random(seed)
    boots = []
    for _ in range(BOOTSTRAP):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(_predict(steps, [[c[j] for j in idx] for c in correct], target, n))
    mean = sum(boots) / len(boots)
    spread = math.sqrt(sum((b - mean) ** 2 for b in boots) / (len(boots) - 1))
    own_noise = binomial_noise(expected, n)
    floor = MIN_ERROR_SHARE / n
    _, alpha = _fit_log_log(steps, [max(floor, 1 - sum(c) / n) for c in correct])
    return {"expected_score": expected, "uncertainty": math.sqrt(spread ** 2 + own_noise ** 2), "alpha": alpha,
            "points": [{"step": s, "score": sum(c) / n} for s, c in zip(steps, correct)], "target_steps": target}


def binomial_noise(score: float, n: int) -> float:
    """The standard error of a score measured on n examples; a score of 0 or 1 is taken as half an
    example off, since no example set proves a rate of exactly 0."""
    p = min(max(score, MIN_ERROR_SHARE / n), 1 - MIN_ERROR_SHARE / n)
    return math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- the pilots


def pilot_steps(minutes: float, step_time_s: float, full_steps: int) -> int:
    """Optimizer steps that `minutes` of predicted compute buy, at least PILOT_POINTS, at most the full run."""
    return max(min(PILOT_POINTS, full_steps), min(full_steps, int(minutes * 60 / step_time_s)))


def forgetting_label(ppl_change: float, drift_kl: float) -> str:
    """low / medium / high from the measured general-text perplexity change and drift (project thresholds)."""
    if ppl_change >= 0.2 or drift_kl >= 0.5:
        return "high"
    if ppl_change >= 0.05 or drift_kl >= 0.1:
        return "medium"
    return "low"


class HeldOut:
    """Per-example correctness of a model on held-out (prompt, answer) pairs, greedy, zero-shot."""

    def __init__(self, tokenizer, held: list[tuple[dict, object, str]], prompt_text: Callable, correct: Callable):
        self.tok, self.held, self._prompt, self._correct = tokenizer, held, prompt_text, correct
        self.max_new = max(len(tokenizer(a)["input_ids"]) for _, _, a in held) + 8

    def __call__(self, model) -> list[bool]:
        from posttrain.eval.lm import generate

        stop = tuple(s for s in (self.tok.eos_token, "\n\n") if s)
        texts = generate(model, self.tok, [self._prompt(self.tok, [], p) for _, p, _ in self.held],
                         max_new_tokens=self.max_new, stop=stop)
        return [bool(self._correct(row, c.strip(), a)) for (row, _, a), c in zip(self.held, texts)]


def schedule_overrides(cfg) -> list[str]:
    """The full run's learning-rate schedule as overrides: the pilot's first steps follow it exactly."""
    warmup = (f"train.warmup_steps={cfg.train.warmup_steps}" if cfg.train.warmup_steps is not None
              else f"train.warmup_ratio={cfg.train.warmup_ratio}")
    return [f"train.schedule={cfg.train.schedule}", warmup]


def run_pilot(cfg, method: str, *, steps: int, full_steps: int, lr: float, scorer: HeldOut, out_dir: Path,
              references: tuple, schedule_steps: Optional[int] = None, domain_text: Optional[str] = None,
              cpt_steps: int = 0, cpt_lr: float = 0.0) -> dict:
    """One pilot: the first `steps` SFT steps of `method`'s full run, whose schedule is `schedule_steps`
    long (default `full_steps`), after the first `cpt_steps` of its continued pretraining for cpt+sft
    (on a schedule as long; counted in the curve's steps); score the held-out rows PILOT_POINTS times,
    extrapolate to `full_steps` (both stages for cpt+sft), measure forgetting."""
    from posttrain.eval.drift import drift
    from posttrain.eval.perplexity import perplexity_change
    from posttrain.stages import cpt, load_config, sft

    common = [f"data.max_length={cfg.data.max_length}", f"train.batch_size={cfg.train.batch_size}",
              f"train.grad_accum={cfg.train.grad_accum}", f"train.seed={cfg.train.seed}", "train.progress=false",
              "eval.guard=off", *schedule_overrides(cfg),
              f"train.gradient_checkpointing={str(cfg.train.gradient_checkpointing).lower()}",
              # the full run's batches (packed: more examples per row); prompt/prefix tuning cannot pack
              f"data.packing={str(cfg.data.packing and method not in ('prompt_tuning', 'prefix_tuning')).lower()}"]
    if "padding_free" in cfg.data.model_fields_set:  # only as the user set it: prompt tuning turns it off
        common.append(f"data.padding_free={str(cfg.data.padding_free).lower()}")
    start, schedule_steps = str(cfg.model), schedule_steps or full_steps
    if method == "cpt+sft":
        c = load_config("cpt", None, [f"model={start}", f"data.train={domain_text}", "adapter.type=none",
                                      f"train.lr={cpt_lr}", f"train.max_steps={cpt_steps}",
                                      f"train.schedule_steps={schedule_steps}",
                                      f"output_dir={out_dir / 'cpt'}", *common])
        start = str(cpt.run(c).model_dir)
    points, correct, drifts = [], [], []
    drift_ref, text_ref = references

    def evaluate(model, step):
        points.append(cpt_steps + step)  # cpt+sft: the curve runs over both stages' steps
        correct.append(scorer(model))
        drifts.append(drift(model, drift_ref, pad_id=scorer.tok.pad_token_id or 0)["drift_kl"])
        return {"target_score": sum(correct[-1]) / len(correct[-1]), "drift_kl": drifts[-1]}

    ov = [f"model={start}", f"data.train={cfg.data.train}", f"adapter.type={PILOT_ADAPTERS[method]}",
          f"train.lr={lr}", f"train.max_steps={steps}", f"train.schedule_steps={schedule_steps}",
          f"train.eval_every={max(1, steps // PILOT_POINTS)}",
          f"output_dir={out_dir / 'sft'}", *common]
    run = sft.run(load_config("sft", None, ov), evaluators=[evaluate])
    pad = run.tokenizer.pad_token_id or 0
    forgetting = {**drift(run.model, drift_ref, pad_id=pad), **perplexity_change(run.model, text_ref, pad_id=pad)}
    out = extrapolate(points, correct, full_steps)
    out.update(method=method, pilot_steps=steps, cpt_steps=cpt_steps, learning_rate=lr,
               pilot_score=out["points"][-1]["score"], drift_kl=forgetting["drift_kl"],
               general_ppl_change=forgetting["general_ppl_change"],
               forgetting_risk=forgetting_label(forgetting["general_ppl_change"], forgetting["drift_kl"]),
               drift_points=drifts, projected_drift_kl=project_drift(points, drifts, full_steps))
    return out


def project_drift(steps: Sequence[int], drifts: Sequence[float], target: int) -> float:
    """The drift from the base at `target` steps: a power law in steps, drift = B t^beta, fitted by least
    squares in log-log space on the pilot's points (drift grows as training moves away from the base)."""
    pts = [(s, d) for s, d in zip(steps, drifts) if d > 0]
    if len(pts) < 2:
        return max(drifts, default=0.0)
    x = [math.log(s) for s, _ in pts]
    y = [math.log(d) for _, d in pts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    beta = max(0.0, sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx) if sxx > 0 else 0.0
    return max(drifts[-1], math.exp(my + beta * (math.log(target) - mx)))
