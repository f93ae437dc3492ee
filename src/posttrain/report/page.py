"""Assemble the self-contained ``report.html``: summary first, curves grouped per stage and by meaning, runs.

Everything the page needs is inside the one file (inline CSS, PNGs as base64 data URIs), so it
can be mailed, attached to a CI artifact or opened from a laptop with no network. The page is a
Jinja2 template (``templates/report.html``); this module only computes what it shows.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.report.groups import FOLDED, group_of, metric_order, splits_of, worth_plotting
from posttrain.report.metrics import is_number, last_values, series
from posttrain.report.lineplot import plot_metric, title_of
from posttrain.report.runs import load_run
from posttrain.report.templates import CSS, render

# Columns the issue puts first in every summary table.
_LEAD_COLUMNS = ["task_accuracy", "regression_score"]
# Which way is better, for colouring deltas; names not listed get no colour rather than a guess.
_HIGHER_BETTER = ("accuracy", "acc", "score", "reward", "win_rate", "exact_match", "pass")
_LOWER_BETTER = ("loss", "perplexity", "ppl", "refusal_rate_benign", "over_refusal")


@dataclass
class Section:
    """A part of the page after the summary table: a heading, an HTML fragment (a table), and figures.

    ``figures`` holds ``(alt text, PNG bytes)``; they are embedded like the curves. Evaluation
    reports (``posttrain eval``) use sections for their delta table and score plots.
    """

    heading: str
    html: str = ""
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def _figures(figures: list[tuple[str, bytes]]) -> list[dict]:
    return [{"alt": alt, "data": base64.b64encode(png).decode("ascii")} for alt, png in figures]


def fmt(v) -> str:
    """A metric value as shown in tables.

    3 decimals in [1e-3, 100) (accuracies, losses), 1 decimal up to 1e6 (throughput, seconds),
    3 significant digits otherwise (learning rates, huge counts); ints stay exact.
    """
    if isinstance(v, dict) and is_number(v.get("value")):
        s = fmt(v["value"])
        return f"{s} ± {fmt(v['stderr'])}" if is_number(v.get("stderr")) else s
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0 or 1e-3 <= abs(v) < 100:
            return f"{v:.3f}"
        if 100 <= abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def _number(v):
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if is_number(v) else None


def _direction(key: str) -> int:
    k = key.lower()
    if any(t in k for t in _LOWER_BETTER):
        return -1
    if any(t in k for t in _HIGHER_BETTER):
        return 1
    return 0


def _cell(key: str, value, base_value) -> dict:
    cell = {"text": fmt(value), "delta": None, "cls": ""}
    v, b = _number(value), _number(base_value)
    if v is None or b is None:
        return cell
    d = v - b
    sign = _direction(key) * d
    cell["cls"] = "up" if sign > 0 else "down" if sign < 0 else ""
    cell["delta"] = f"{d:+.3f}" if abs(d) >= 1e-3 or d == 0 else f"{d:+.2g}"
    return cell


def summary_data(summary: dict[str, dict], *, row_label: str = "stage") -> dict:
    """The summary table as template data: one row per stage; lead columns first, then every other key
    in first-seen order. When a ``base`` row exists, every other row carries its delta against it."""
    columns = [c for c in _LEAD_COLUMNS if any(c in m for m in summary.values())]
    for metrics in summary.values():
        columns += [k for k in metrics if k not in columns]
    base = summary.get("base")
    order = (["base"] if base is not None else []) + [s for s in summary if s != "base"]
    rows = []
    for stage in order:
        metrics = summary[stage]
        cells = []
        for c in columns:
            if c not in metrics:
                cells.append({"text": "–", "delta": None, "cls": ""})
            else:
                ref = base.get(c) if base is not None and stage != "base" else None
                cells.append(_cell(c, metrics[c], ref))
        rows.append({"label": str(stage), "cells": cells})
    return {"head": [row_label, *columns], "rows": rows}


def summary_table(summary: dict[str, dict], *, row_label: str = "stage") -> str:
    """`summary_data` rendered as an HTML fragment (for a `Section`)."""
    return render("table.html", t=summary_data(summary, row_label=row_label))


# Splits logged once, not over steps (the engine's dataset statistics at step 0): a one-point
# "curve" per key says nothing, so they appear in the last-values table only.
_NOT_CURVES = {"data"}


def curve_groups(runs: list[dict]) -> list[dict]:
    """Curves per stage kind (runs of the same stage share axes, one colour per run), and within a
    stage by meaning (`groups.GROUPS`); constants and single points are left to the tables."""
    color_of = {r["name"]: i for i, r in enumerate(runs)}
    by_stage: dict[str, list[dict]] = {}
    for r in runs:
        by_stage.setdefault(r["stage"], []).append(r)
    out = []
    for stage, members in by_stage.items():
        per_run = [(r["name"], {k: v for k, v in series(r["rows"]).items() if k not in _NOT_CURVES})
                   for r in members]
        keys = {k for _, s in per_run for metrics in s.values() for k in metrics}
        meanings: dict[str, list] = {}
        for key in metric_order(keys):
            lines = [
                (name, split, *s[split][key])
                for name, s in per_run
                for split in splits_of(s, key)
            ]
            if not worth_plotting([values for *_, values in lines]):
                continue
            meanings.setdefault(group_of(key), []).append((title_of(key), plot_metric(key, lines, color_of=color_of)))
        if meanings:
            names = [r["name"] for r in members]
            title = stage if names == [stage] else f"{stage}: {', '.join(names)}"
            out.append({"title": title, "meanings": [{"name": k, "figures": _figures(v), "folded": k in FOLDED}
                                                     for k, v in meanings.items()]})
    return out


def _runs_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        steps = [row["step"] for row in r["rows"] if is_number(row.get("step"))]
        details = [(label, r[key]) for label, key in (("config.yaml (resolved config)", "config"),
                                                      ("manifest.json", "manifest")) if r[key] is not None]
        rows.append({"name": r["name"], "path": str(r["path"]), "status": r["status"],
                     "last_step": str(max(steps)) if steps else "–",
                     "events": len(r["rows"]) if r["has_metrics"] else "no metrics.jsonl",
                     "skipped": r["skipped"], "details": details})
    return rows


def _duration(s) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 \
        else f"{s} s"


def glance_data(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        g = dict(r["glance"])
        g["duration"] = _duration(g["duration_s"])
        g["headline"] = [(k, fmt(v)) for k, v in g["headline"].items()]
        out.append({"name": r["name"], "g": g})
    return out


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in paths]
    for i, n in enumerate(names):
        if names.count(n) > 1:
            names[i] = f"{paths[i].resolve().parent.name}/{n}"
    return names


def build_report(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    *,
    title: str | None = None,
    summary: dict | None = None,
    stages: dict[str, str | Path] | None = None,
    sections: list[Section] | None = None,
    manifests: dict[str | Path, dict] | None = None,
) -> Path:
    """Write one self-contained HTML report for one or several runs and return its path.

    ``run_dirs`` are run directories (see docs/architecture.md); ``stages`` maps a stage name to
    its run directory (a pipeline or the demo) and is shown after them. Curves of runs of the same
    stage kind share axes, one colour per run (`curve_groups`). ``summary`` (``{stage: {metric: value}}``) fills the stage table;
    without it the ``summary.json`` files found in the run directories are merged. ``out``
    defaults to ``<first run dir>/report.html``. ``sections`` (see `Section`) follow the summary
    table; a report made of sections only (an evaluation, no training run) needs ``out``.
    ``manifests`` maps a run directory to the manifest it is about to be signed off with (the
    engine writes the report first and the manifest last).
    """
    paths = [Path(p) for p in run_dirs]
    runs_in = list(zip(_unique_names(paths), paths)) + [(str(k), Path(v)) for k, v in (stages or {}).items()]
    if not runs_in and not sections:
        raise ValueError("build_report needs at least one run directory (run_dirs or stages) or a section")
    if not runs_in and out is None:
        raise ValueError("build_report without run directories needs out= (where to write the page)")
    for name, p in runs_in:
        if not p.is_dir():
            raise FileNotFoundError(f"run {name!r}: {p} is not a directory")
    if out is None:
        out = runs_in[0][1] / "report.html"
    out = Path(out)
    given = {Path(k).resolve(): v for k, v in (manifests or {}).items()}
    runs = [load_run(name, p, given.get(p.resolve())) for name, p in runs_in]
    if summary is None:
        merged = {}
        for r in runs:
            if isinstance(r["summary"], dict):
                merged.update({k: v for k, v in r["summary"].items() if isinstance(v, dict)})
        summary = merged or None
    title = title or "posttrain report: " + (", ".join(n for n, _ in runs_in) or "evaluation")
    last = {r["name"]: last_values(r["rows"]) for r in runs if r["rows"]}
    page = render(
        "report.html", title=title, css=CSS, stamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        glance=glance_data([r for r in runs if r["has_metrics"] or r["manifest"]]),
        summary=summary_data(summary) if summary else None,
        sections=[{"heading": s.heading, "html": s.html, "figures": _figures(s.figures)} for s in sections or []],
        curves=curve_groups(runs), last=summary_data(last, row_label="run") if last else None,
        runs=_runs_rows(runs), notes=[n for r in runs for n in r["skipped"]],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader (or a browser refresh) never sees half a page
    return out
