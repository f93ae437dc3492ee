"""Assemble the self-contained ``report.html``: summary table, curves, runs, config and manifest.

Everything the page needs is inside the one file (inline CSS, PNGs as base64 data URIs), so it
can be mailed, attached to a CI artifact or opened from a laptop with no network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.report.metrics import _read, is_number, last_values, metrics_path, series
from posttrain.report.plots import metric_order, plot_metric, title_of

# Columns the issue puts first in every summary table.
_LEAD_COLUMNS = ["task_accuracy", "regression_score"]
# Which way is better, for colouring deltas; names not listed get no colour rather than a guess.
_HIGHER_BETTER = ("accuracy", "acc", "score", "reward", "win_rate", "exact_match", "pass")
_LOWER_BETTER = ("loss", "perplexity", "ppl", "refusal_rate_benign", "over_refusal")
_MAX_EMBED = 200_000  # characters of config/manifest shown; more is truncated, not dropped silently

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d2433;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.meta{color:#667085;font-size:12px}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde2ea;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f3f5f9}td.t,th.t{text-align:left}td:first-child,th:first-child{text-align:left;font-weight:600}
.d{display:block;font-size:11px;color:#667085}.up{color:#1a7f37}.down{color:#c62828}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #dde2ea;border-radius:6px;padding:4px;background:#fff}
img{display:block;max-width:100%}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px;font-size:12px}
.warn{color:#9a6700}
"""


@dataclass
class Section:
    """A part of the page after the summary table: a heading, an HTML fragment (a table), and figures.

    ``figures`` holds ``(alt text, PNG bytes)``; they are embedded like the curves. Evaluation
    reports (``posttrain eval``) use sections for their delta table and score plots.
    """

    heading: str
    html: str = ""
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def _figures(figures: list[tuple[str, bytes]]) -> str:
    parts = ['<div class="plots">']
    for alt_text, png in figures:
        data = base64.b64encode(png).decode("ascii")
        alt = html.escape(alt_text)
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}" title="{alt}"></figure>')
    parts.append("</div>")
    return "\n".join(parts)


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


def _cell(key: str, value, base_value) -> str:
    text = html.escape(fmt(value))
    v, b = _number(value), _number(base_value)
    if v is None or b is None:
        return f"<td>{text}</td>"
    d = v - b
    sign = _direction(key) * d
    cls = "d up" if sign > 0 else "d down" if sign < 0 else "d"
    return f'<td>{text}<span class="{cls}">{html.escape(f"{d:+.3f}" if abs(d) >= 1e-3 or d == 0 else f"{d:+.2g}")} vs base</span></td>'


def summary_table(summary: dict[str, dict], *, row_label: str = "stage") -> str:
    """HTML table: one row per stage; lead columns first, then every other key in first-seen order.

    When a ``base`` row exists, every other row shows its delta against it under each number.
    """
    columns = [c for c in _LEAD_COLUMNS if any(c in m for m in summary.values())]
    for metrics in summary.values():
        columns += [k for k in metrics if k not in columns]
    base = summary.get("base")
    order = (["base"] if base is not None else []) + [s for s in summary if s != "base"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [row_label, *columns])
    rows = []
    for stage in order:
        metrics = summary[stage]
        cells = []
        for c in columns:
            if c not in metrics:
                cells.append("<td>–</td>")
            else:
                ref = base.get(c) if base is not None and stage != "base" else None
                cells.append(_cell(c, metrics[c], ref))
        rows.append(f"<tr><td>{html.escape(str(stage))}</td>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _load_run(name: str, path: Path, manifest_override: dict | None = None) -> dict:
    run = {"name": name, "path": path, "rows": [], "skipped": [], "has_metrics": False}
    if metrics_path(path).exists():
        run["rows"], run["skipped"] = _read(path)
        run["has_metrics"] = True
        for note in run["skipped"]:
            warnings.warn(f"skipped {note} ({path})", UserWarning, stacklevel=3)
    run["config"] = _read_text(path / "config.yaml")
    manifest = _read_text(path / "manifest.json")
    if manifest_override is not None:  # a run being signed off: the report is written before its manifest
        manifest = json.dumps(manifest_override, default=str)
    run["status"] = "no manifest.json (unfinished)"
    if manifest is not None:
        try:
            m = json.loads(manifest)
            manifest = json.dumps(m, indent=2, sort_keys=True)
            run["status"] = str(m.get("status", "unknown")) if isinstance(m, dict) else "unknown"
        except json.JSONDecodeError:
            run["status"] = "manifest.json unreadable"
    run["manifest"] = manifest
    summary = _read_text(path / "summary.json")
    run["summary"] = None
    if summary is not None:
        try:
            run["summary"] = json.loads(summary)
        except json.JSONDecodeError as e:
            warnings.warn(f"{path / 'summary.json'}: not valid JSON ({e.msg}); ignored", UserWarning, stacklevel=3)
    return run


def _read_text(p: Path) -> str | None:
    if not p.is_file():
        return None
    text = p.read_text(encoding="utf-8", errors="replace")
    if len(text) > _MAX_EMBED:
        text = text[:_MAX_EMBED] + f"\n... truncated ({len(text)} characters in {p.name})"
    return text


# Splits logged once, not over steps (the engine's dataset statistics at step 0): a one-point
# "curve" per key says nothing, so they appear in the last-values table only.
_NOT_CURVES = {"data"}


def _plots(runs: list[dict]) -> list[tuple[str, bytes]]:
    per_run = [(r["name"], {k: v for k, v in series(r["rows"]).items() if k not in _NOT_CURVES}) for r in runs]
    keys = {k for _, s in per_run for metrics in s.values() for k in metrics}
    color_of = {name: i for i, (name, _) in enumerate(per_run)}
    out = []
    for key in metric_order(keys):
        lines = [
            (name, split, *s[split][key])
            for name, s in per_run
            for split in sorted(s, key=lambda x: (x != "train", x != "eval", x))
            if key in s[split]
        ]
        out.append((key, plot_metric(key, lines, color_of=color_of)))
    return out


def _last_values_table(runs: list[dict]) -> str:
    per_run = {r["name"]: last_values(r["rows"]) for r in runs if r["rows"]}
    if not per_run:
        return ""
    return summary_table(per_run, row_label="run")


def _runs_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        steps = [row["step"] for row in r["rows"] if is_number(row.get("step"))]
        skipped = f'<span class="warn">{len(r["skipped"])}</span>' if r["skipped"] else "0"
        logged = len(r["rows"]) if r["has_metrics"] else "no metrics.jsonl"
        text = [html.escape(r["name"]), html.escape(str(r["path"])), html.escape(r["status"])]
        numbers = [html.escape(str(max(steps)) if steps else "–"), html.escape(str(logged)), skipped]
        cells = "".join(f'<td class="t">{c}</td>' for c in text) + "".join(f"<td>{c}</td>" for c in numbers)
        rows.append(f"<tr>{cells}</tr>")
    head = "".join(f'<th class="t">{h}</th>' for h in ["run", "directory", "status"])
    head += "".join(f"<th>{h}</th>" for h in ["last step", "events", "skipped lines"])
    notes = "".join(f'<li class="warn">{html.escape(n)}</li>' for r in runs for n in r["skipped"])
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>' + (
        f"<ul>{notes}</ul>" if notes else ""
    )


def _details(runs: list[dict]) -> str:
    parts = []
    for r in runs:
        for label, key in (("config.yaml (resolved config)", "config"), ("manifest.json", "manifest")):
            if r[key] is not None:
                parts.append(
                    f"<details><summary>{html.escape(r['name'])}: {label}</summary>"
                    f"<pre>{html.escape(r[key])}</pre></details>"
                )
    return "".join(parts)


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
    its run directory (a pipeline or the demo) and is shown after them. Curves of all runs share
    axes, one colour per run. ``summary`` (``{stage: {metric: value}}``) fills the stage table;
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
    runs = [_load_run(name, p, given.get(p.resolve())) for name, p in runs_in]
    if summary is None:
        merged = {}
        for r in runs:
            if isinstance(r["summary"], dict):
                merged.update({k: v for k, v in r["summary"].items() if isinstance(v, dict)})
        summary = merged or None
    title = title or "posttrain report: " + (", ".join(n for n, _ in runs_in) or "evaluation")

    body = [f"<h1>{html.escape(title)}</h1>"]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<div class="meta">generated {stamp} by posttrain.report</div>')
    if summary:
        body += ["<h2>Summary</h2>", summary_table(summary)]
    for sec in sections or []:
        body.append(f"<h2>{html.escape(sec.heading)}</h2>")
        body += [sec.html] + ([_figures(sec.figures)] if sec.figures else [])
    plots = _plots(runs)
    if plots:
        body += ["<h2>Curves</h2>", _figures([(title_of(key), png) for key, png in plots])]
    last = _last_values_table(runs)
    if last:
        body += ["<h2>Last logged values</h2>", last]
    if runs:
        body += ["<h2>Runs</h2>", _runs_table(runs), _details(runs)]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader (or a browser refresh) never sees half a page
    return out
