"""The `posttrain eval` HTML report: summary, a table of deltas, and plots, through `posttrain.report`.

    eval_report(results, "eval-out/report.html")    # results = evaluate(...) (or results.json, loaded)

The page has the same layout and machinery as a training run's report (`build_report`), with
sections instead of curves, because an evaluation has no steps:

- "Base vs tuned": every compared metric with base ± SE, tuned ± SE, delta ± SE (paired) and a
  flag (REGRESSION beyond `max_drop`, `*` when |delta| > 1.96 SE); absent without a baseline.
- plots: the suite score and the primary metric of every task (base and tuned bars with ±1 SE),
  and the delta of every 0-1 metric with its 95% interval, regressions in red and the `max_drop`
  line dashed. Perplexity-like metrics are left out of both plots: their scale is not points
  (they are in the tables).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Union

from posttrain.eval.kinds import UNBOUNDED
from posttrain.report import Section, build_report
from posttrain.report.page import fmt
from posttrain.report.plots import plot_bars, plot_deltas

# Alt texts of the figures: tests and screen readers find the plots by them.
ALT_SCORES = "primary metric per task: base vs tuned (±1 SE)"
ALT_SCORES_SINGLE = "primary metric per task (±1 SE)"
ALT_DELTAS = "delta per metric, tuned − base (95% interval)"


def summary_rows(res: dict) -> dict:
    """One flat {metric: {"value", "stderr"}} row for the report's summary table."""
    row = {}
    if res.get("score"):
        row["score"] = {"value": res["score"]["value"], "stderr": res["score"]["stderr"]}
    for name, t in res["tasks"].items():
        for k, m in t["metrics"].items():
            row[f"{name}.{k}"] = {"value": m["value"], "stderr": m["stderr"]}
    return row


def delta_table(cmp: dict) -> str:
    """HTML table of `compare(...)` rows: task, metric, base, tuned, delta ± SE, flag."""
    head = "".join(f'<th class="t">{h}</th>' for h in ("task", "metric")) + "".join(
        f"<th>{h}</th>" for h in ("base", "tuned", "delta ± se", "flag"))
    rows = []
    for r in cmp["rows"]:
        flag = "REGRESSION" if r["regression"] else ("*" if r["significant"] else "")
        better = (r["delta"] > 0) == r["higher_is_better"]
        cls = "" if r["delta"] == 0 else (' class="up"' if better else ' class="down"')
        cells = [f'<td class="t">{html.escape(r["task"])}</td>', f'<td class="t">{html.escape(r["metric"])}</td>',
                 f"<td>{html.escape(_pm(r['base'], r['base_stderr']))}</td>",
                 f"<td>{html.escape(_pm(r['tuned'], r['tuned_stderr']))}</td>",
                 f"<td{cls}>{html.escape(_delta(r))}</td>",
                 f'<td class="t{" down" if r["regression"] else ""}">{flag}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (f'<p class="meta">{len(cmp["regressions"])} regression(s) beyond max_drop={cmp["max_drop"]:g} '
            "(0-1 rates: absolute points; perplexity-like: relative). * = |delta| &gt; 1.96 SE; SEs of deltas "
            "are paired over items.</p>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            + note)


def _delta(r: dict) -> str:
    return f"{r['delta']:+.3f} ± {r['stderr']:.3f}"


def _pm(v, se) -> str:
    return fmt(v) if se is None else f"{fmt(v)} ± {fmt(se)}"


def _score_plot(results: dict) -> tuple[str, bytes]:
    tuned = results["tuned"]
    # bits per byte or perplexity on a 0-1 axis would flatten every accuracy: those stay in the tables
    names = [n for n, t in tuned["tasks"].items() if t["primary"] not in UNBOUNDED] or list(tuned["tasks"])
    labels = [f"{n} ({tuned['tasks'][n]['primary']})" for n in names]
    groups = []
    for label in ("base", "tuned"):
        res = results.get(label)
        if res is None:
            continue
        ms = [res["tasks"][n]["metrics"][res["tasks"][n]["primary"]] for n in names]
        groups.append((label, [m["value"] for m in ms], [m["stderr"] for m in ms]))
    if tuned.get("score"):
        labels.insert(0, "suite score")
        for (label, values, errors) in groups:
            s = results[label]["score"]
            values.insert(0, s["value"])
            errors.insert(0, s["stderr"])
    alt = ALT_SCORES if len(groups) > 1 else ALT_SCORES_SINGLE
    return alt, plot_bars(alt, labels, groups, xlabel="value")


def _delta_plot(cmp: dict) -> tuple[str, bytes] | None:
    rows = [r for r in cmp["rows"] if r["metric"] not in UNBOUNDED]
    if not rows:
        return None
    return ALT_DELTAS, plot_deltas(ALT_DELTAS, [f"{r['task']}.{r['metric']}" for r in rows],
                                   [r["delta"] for r in rows], [1.96 * r["stderr"] for r in rows],
                                   [r["regression"] for r in rows], threshold=cmp["max_drop"])


def eval_report(results: dict, out: Union[str, Path]) -> Path:
    """Write the evaluation's report.html (summary table, delta table, plots) to `out`; returns its path."""
    tuned = results["tuned"]
    summary = {label: summary_rows(results[label]) for label in ("base", "tuned") if results.get(label)}
    sections = []
    cmp = results.get("comparison")
    if cmp:
        figures = [_score_plot(results)]
        delta = _delta_plot(cmp)
        if delta:
            figures.append(delta)
        sections.append(Section("Base vs tuned", delta_table(cmp), figures))
    else:
        sections.append(Section("Scores", "", [_score_plot(results)]))
    model = tuned.get("model", "")
    title = f"posttrain eval: {tuned['suite']}" + (f" ({model})" if model else "")
    return build_report([], out, title=title, summary=summary, sections=sections)
