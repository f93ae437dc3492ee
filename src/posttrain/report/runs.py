"""One run directory read for display: its metrics, config, manifest, status and headline numbers.

Shared by ``report.html`` and the studio's runs list, so both say the same thing about a run.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from pathlib import Path
from typing import Optional

import yaml

from posttrain.report.metrics import _read, as_number, is_number, metrics_path, series

MAX_EMBED = 200_000  # characters of config/manifest shown; more is truncated, not dropped silently
UNFINISHED = "no manifest.json (unfinished)"
GUARD_STOPPED = "stopped by the guard"


def read_text(p: Path) -> str | None:
    if not p.is_file():
        return None
    text = p.read_text(encoding="utf-8", errors="replace")
    if len(text) > MAX_EMBED:
        text = text[:MAX_EMBED] + f"\n... truncated ({len(text)} characters in {p.name})"
    return text


def _yaml_mapping(text: str | None) -> dict:
    if not text:
        return {}
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return v if isinstance(v, dict) else {}


def status_of(manifest: dict | None) -> str:
    """completed | failed | stopped by the guard | ... from the manifest; `UNFINISHED` without one."""
    if manifest is None:
        return UNFINISHED
    status = str(manifest.get("status", "unknown"))
    reason = str((manifest.get("result") or {}).get("stop_reason") or "")
    if status == "completed" and "guard" in reason:
        return GUARD_STOPPED
    return status


def load_run(name: str, path: Path, manifest_override: dict | None = None, *, warn: bool = True) -> dict:
    """Everything a page shows about one run directory (see docs/report.md, "What a run shows")."""
    run = {"name": name, "path": path, "rows": [], "skipped": [], "has_metrics": False}
    if metrics_path(path).exists():
        run["rows"], run["skipped"] = _read(path)
        run["has_metrics"] = True
        if warn:
            for note in run["skipped"]:
                warnings.warn(f"skipped {note} ({path})", UserWarning, stacklevel=3)
    run["config"] = read_text(path / "config.yaml")
    cfg = _yaml_mapping(run["config"])
    manifest_text = read_text(path / "manifest.json")
    if manifest_override is not None:  # a run being signed off: the report is written before its manifest
        manifest_text = json.dumps(manifest_override, default=str)
    manifest = None
    run["status"] = UNFINISHED
    if manifest_text is not None:
        try:
            m = json.loads(manifest_text)
            manifest_text = json.dumps(m, indent=2, sort_keys=True)
            manifest = m if isinstance(m, dict) else {}
            run["status"] = status_of(manifest)
        except json.JSONDecodeError:
            run["status"] = "manifest.json unreadable"
    run["manifest"] = manifest_text
    run["manifest_data"] = manifest or {}
    summary = read_text(path / "summary.json")
    run["summary"] = None
    if summary is not None:
        try:
            run["summary"] = json.loads(summary)
        except json.JSONDecodeError as e:
            if warn:
                warnings.warn(f"{path / 'summary.json'}: not valid JSON ({e.msg}); ignored", UserWarning, stacklevel=3)
    run["config_data"] = cfg
    run["stage"] = str((manifest or {}).get("stage") or cfg.get("stage") or "run")
    run["model"] = str((manifest or {}).get("base_model") or cfg.get("model") or "–")
    run["glance"] = glance(run)
    return run


def _parse_time(s) -> _dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        return _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def _last(s: dict, split: str, key: str):
    steps_values = s.get(split, {}).get(key)
    return steps_values[1][-1] if steps_values else None


def glance(run: dict) -> dict:
    """The few numbers a person reads first: status, stage, model, start, duration, steps, headline metrics."""
    m = run.get("manifest_data") or {}
    s = series(run["rows"])
    times = [t for r in run["rows"] if (t := as_number(r.get("time"))) is not None]
    started = _parse_time(m.get("started"))
    finished = _parse_time(m.get("finished"))
    if started is None and times:
        started = _dt.datetime.fromtimestamp(min(times), _dt.timezone.utc)
    duration = (finished - started).total_seconds() if started and finished else (
        max(times) - min(times) if len(times) > 1 else None)
    steps = [r["step"] for r in run["rows"] if is_number(r.get("step"))]
    headline = {}
    for label, split, key in (("final train loss", "train", "loss"), ("final eval loss", "eval", "loss"),
                              ("task accuracy", "eval", "task_accuracy"),
                              ("regression score", "eval", "regression_score"), ("reward", "train", "reward")):
        v = _last(s, split, key)
        if v is not None:
            headline[label] = v
    reason = (m.get("result") or {}).get("stop_reason")
    return {
        "status": run["status"], "stage": run["stage"], "model": run["model"],
        "started": started.strftime("%Y-%m-%d %H:%M UTC") if started else "–",
        "duration_s": duration, "last_step": max(steps) if steps else None, "headline": headline,
        "guard": _guard(reason, (run.get("config_data") or {}).get("eval") or {}, "regression score" in headline,
                        (m.get("result") or {}).get("guard")),
        "error": m.get("error"),
    }


def _guard(reason, eval_cfg: dict, measured: bool, drift: Optional[dict] = None) -> str:
    """The forgetting guard's verdict in a few words (`drift`: the result's `guard` summary, eval/guard.py)."""
    if reason and "guard" in str(reason):
        return str(reason)
    if isinstance(drift, dict) and "drift_kl" in drift:
        return drift_verdict(drift)
    if isinstance(eval_cfg, dict) and eval_cfg.get("regression_max_drop"):
        return f"on (max drop {eval_cfg['regression_max_drop']}): did not stop the run"
    return "off (regression score measured)" if measured else "off"


def drift_verdict(g: dict) -> str:
    """The default guard's summary in one line: its checks and the last one's numbers against the limits."""
    if not g.get("checks"):
        return f"on (drift guard): {g.get('note') or 'no check after the start'}"
    return (f"on (drift guard): {g['checks']} check(s) did not stop the run; last drift {g['drift_kl']:.3f} nats/token "
            f"(limit {g['max_drift_kl']}), general perplexity change {g['general_ppl_change']:+.1%} "
            f"(limit {'none' if g['max_ppl_change'] is None else format(g['max_ppl_change'], '.0%')})")
