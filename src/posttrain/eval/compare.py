"""Base vs tuned: per-metric deltas with standard errors, and the regression (alignment-tax) gate.

A metric regresses when it moves the wrong way by more than `max_drop`: in absolute points on
0-1 rates (max_drop 0.02 = 2 points of accuracy), and relative to the base value for unbounded
metrics such as perplexity (0.02 = 2% worse). A drop equal to the limit is not beyond it, even
when floating point says 0.98 - 0.96 = 0.020000000000000018 (`beyond`).

With `significance=alpha` a drop past the limit must also be significant: a one-sided z-test,
drop > z(1 - alpha) * se, so a 5.6-point drop with an SE of 9.7 points passes at alpha 0.05
(z = 1.645). The SE of a delta is paired over items when both runs scored the same items (see
stats.diff_se), which is the case for identical settings; an SE of 0 makes any drop significant.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional

from posttrain.eval import stats
from posttrain.eval.kinds import LOWER_IS_BETTER, UNBOUNDED

DEFAULT_MAX_DROP = 0.02


def beyond(drop: float, limit: float) -> bool:
    """drop > limit, where a drop equal to the limit up to rounding (rel. 1e-9) is not beyond it."""
    return drop > limit and not math.isclose(drop, limit, rel_tol=1e-9, abs_tol=1e-12)


def z_for(significance: Optional[float]) -> Optional[float]:
    """The one-sided critical value z(1 - alpha); None when no significance is required."""
    if significance is None:
        return None
    if not 0.0 < significance < 0.5:
        raise ValueError(f"significance must be in (0, 0.5), got {significance}")
    return NormalDist().inv_cdf(1.0 - significance)


def is_regression(worse: float, worse_se: float, max_drop: float, z: Optional[float] = None) -> bool:
    """The gate: the tuned model is worse by more than `max_drop` and, when z is given, by more than z SEs.

    `worse` > 0 means worse, in the same units as `max_drop` (points, or relative for unbounded
    metrics); `worse_se` is its standard error in those units.
    """
    return beyond(worse, max_drop) and (z is None or worse > z * worse_se)


def _row(task: str, metric: str, b: dict, t: dict, b_items, t_items, max_drop: float, z: Optional[float]) -> dict:
    delta = t["value"] - b["value"]
    se, paired = stats.diff_se(b_items, t_items, b.get("stderr", 0.0), t.get("stderr", 0.0))
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    worse, worse_se = -sign * delta, se  # worse > 0 means the tuned model is worse
    if metric in UNBOUNDED:
        scale = abs(b["value"])
        worse, worse_se = (worse / scale, se / scale) if scale else (math.inf * (worse > 0), se)
    return {"task": task, "metric": metric, "base": b["value"], "base_stderr": b.get("stderr"),
            "tuned": t["value"], "tuned_stderr": t.get("stderr"), "delta": delta, "stderr": se, "paired": paired,
            "higher_is_better": sign > 0, "regression": is_regression(worse, worse_se, max_drop, z),
            "significant": se > 0 and abs(delta) > 1.96 * se}


def compare(base: dict, tuned: dict, *, max_drop: float = DEFAULT_MAX_DROP,
            significance: Optional[float] = None) -> dict:
    """Compare two `run_suite` results of the same suite; returns rows, the score row and the regressions.

    `significance` (alpha, e.g. 0.05): flag a drop past `max_drop` only when it is also significant
    at that level (one-sided z-test on the SE of the delta); None flags every drop past the limit.
    """
    z = z_for(significance)
    if set(base["tasks"]) != set(tuned["tasks"]):
        raise ValueError(f"the two results cover different tasks: {sorted(base['tasks'])} vs {sorted(tuned['tasks'])}")
    rows = []
    score_var = 0.0
    scored = 0
    for name, bt in base["tasks"].items():
        tt = tuned["tasks"][name]
        for metric, bm in bt["metrics"].items():
            if metric not in tt["metrics"]:
                continue
            row = _row(name, metric, bm, tt["metrics"][metric], bt["items"].get(metric), tt["items"].get(metric),
                       max_drop, z)
            rows.append(row)
            if metric == bt["primary"] and bt["in_score"]:
                score_var += row["stderr"] ** 2
                scored += 1
    score = None
    if base.get("score") and tuned.get("score"):
        b, t = base["score"], tuned["score"]
        delta = t["value"] - b["value"]
        se = math.sqrt(score_var) / max(1, scored)
        score = {"task": "suite", "metric": "score", "base": b["value"], "base_stderr": b["stderr"],
                 "tuned": t["value"], "tuned_stderr": t["stderr"], "delta": delta, "stderr": se, "paired": True,
                 "higher_is_better": True, "regression": is_regression(-delta, se, max_drop, z),
                 "significant": se > 0 and abs(delta) > 1.96 * se}
        rows.insert(0, score)
    regressions = [r for r in rows if r["regression"]]
    return {"max_drop": max_drop, "significance": significance, "rows": rows, "score": score,
            "regressions": regressions, "passed": not regressions}


def _pm(v, se) -> str:
    if v is None:
        return "-"
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def format_comparison(cmp: dict) -> str:
    """A plain-text table for the terminal: base, tuned, delta ± SE of the difference, and flags."""
    head = ("task", "metric", "base", "tuned", "delta ± se", "")
    lines = [head]
    for r in cmp["rows"]:
        flag = "REGRESSION" if r["regression"] else ("*" if r["significant"] else "")
        lines.append((r["task"], r["metric"], _pm(r["base"], r["base_stderr"]), _pm(r["tuned"], r["tuned_stderr"]),
                      f"{r['delta']:+.4f} ± {r['stderr']:.4f}", flag))
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    n = len(cmp["regressions"])
    alpha = cmp.get("significance")
    sig = f", significant at alpha={alpha} (one-sided)" if alpha is not None else ""
    out.append(f"\n{n} regression(s) beyond max_drop={cmp['max_drop']}{sig} (0-1 rates: absolute points; "
               "perplexity-like: relative); * = |delta| > 1.96 se")
    return "\n".join(out)


def format_results(res: dict) -> str:
    lines = [f"suite {res['suite']}: score {_pm(res['score']['value'], res['score']['stderr'])}"
             if res.get("score") else f"suite {res['suite']}"]
    for name, t in res["tasks"].items():
        ms = ", ".join(f"{k} {_pm(m['value'], m['stderr'])}" for k, m in t["metrics"].items())
        lines.append(f"  {name} ({t['kind']}, n={t['n']}): {ms}")
    return "\n".join(lines)
