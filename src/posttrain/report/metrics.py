"""Read a run's ``metrics.jsonl`` and turn it into per-split, per-metric series over steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# Keys that describe a row rather than measure something.
_NOT_METRICS = {"step", "split", "epoch_end"}


def metrics_path(run_dir: str | Path) -> Path:
    """The ``metrics.jsonl`` of a run directory (or the path itself when it already names a file)."""
    p = Path(run_dir)
    return p if p.is_file() else p / METRICS_FILE


def _read(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Rows plus one human-readable note per skipped line."""
    path = metrics_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file; is {Path(run_dir)} a posttrain run directory?")
    rows, skipped = [], []
    # errors="replace": a run killed mid-write can leave half a UTF-8 sequence at the end.
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(f"{path.name} line {lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skipped.append(f"{path.name} line {lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append(row)
    return rows, skipped


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All logged events of a run, in file order.

    ``run_dir`` is a run directory or a ``metrics.jsonl`` path. Lines that are not a JSON object
    (typically the half-written last line of a killed run) are skipped with a ``UserWarning`` that
    names the file and line; they never raise.
    """
    rows, skipped = _read(run_dir)
    for note in skipped:
        warnings.warn(f"skipped {note}", UserWarning, stacklevel=2)
    return rows


def is_number(v) -> bool:
    # bool is an int subclass, but a flag is not a curve.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "infinity": float("inf"),
               "-infinity": float("-inf")}


def as_number(v):
    """The value as a number, or None. Non-finite floats arrive as strings ("nan"), because strict
    JSON has no NaN and the engine's logger writes them that way; they stay on the curve as gaps."""
    if is_number(v):
        return v
    if isinstance(v, str):
        return _NON_FINITE.get(v.strip().lower())
    return None


def series(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{split: {metric: (steps, values)}}`` for every numeric key of rows that carry a numeric step.

    Rows without ``split`` count as ``train``. When a step appears twice for the same split and
    metric (a run resumed from a checkpoint re-logs the steps after it) the later value wins, so a
    resumed curve does not zigzag back in time. Non-finite values are kept: matplotlib draws them
    as gaps, which is what a diverged (NaN) stretch should look like. The logger's wall-clock
    ``time`` stamp becomes ``elapsed_s``, seconds since the run's first event.
    """
    times = [t for r in rows if (t := as_number(r.get("time"))) is not None]
    t0 = min(times) if times else 0
    acc: dict[str, dict[str, dict]] = {}
    for row in rows:
        step = row.get("step")
        if not is_number(step):
            continue
        split = str(row.get("split", "train"))
        for key, value in row.items():
            value = as_number(value)
            if key in _NOT_METRICS or value is None:
                continue
            if key == "time":
                key, value = "elapsed_s", value - t0
            acc.setdefault(split, {}).setdefault(key, {})[step] = value
    out = {}
    for split, metrics in acc.items():
        out[split] = {}
        for key, by_step in metrics.items():
            steps = sorted(by_step)
            out[split][key] = (steps, [by_step[s] for s in steps])
    return out


def last_values(rows: list[dict]) -> dict[str, float]:
    """``{"split/metric": value}`` of the highest step logged for each split and metric."""
    out = {}
    for split, metrics in series(rows).items():
        for key, (_, values) in metrics.items():
            out[f"{split}/{key}"] = values[-1]
    return out
