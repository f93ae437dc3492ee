"""The runs under the studio's folder: training runs, pipelines (one row, their stages beneath) and evaluations.

A run is a directory with a ``config.yaml``, ``manifest.json`` or ``metrics.jsonl``; a pipeline
is one with a ``lineage.json`` (its stage directories are shown inside its row, not again on
their own); an evaluation is one with a ``results.json`` (``posttrain eval --out``); an adviser result is one
with an ``advice.json`` (``posttrain advise --out``), launchable from its page.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.report.runs import UNFINISHED, load_run

RUN_MARKERS = ("manifest.json", "metrics.jsonl", "config.yaml")
STUDIO_DIR = ".studio"  # the studio's own files under the runs folder: launch logs, evaluations
LIVE_S = 60.0  # an unfinished run whose metrics.jsonl changed this recently is shown as running


@dataclass
class Entry:
    rid: str  # the path under the runs folder, with "/"
    kind: str  # "run" | "pipeline" | "eval" | "advice"
    path: Path
    run: dict | None = None  # report.runs.load_run(...) for runs
    stages: list["Entry"] = field(default_factory=list)  # a pipeline's stage runs
    results: dict | None = None  # results.json of an evaluation, advice.json of an adviser result

    @property
    def status(self) -> str:
        if self.kind == "pipeline":
            sts = [s.status for s in self.stages]
            return "running" if "running" in sts else "failed" if "failed" in sts else \
                "completed" if sts and all(s == "completed" for s in sts) else (sts[-1] if sts else "empty")
        if self.kind == "eval":
            return "completed" if (self.results or {}).get("passed", True) else "regression"
        if self.kind == "advice":
            return "advice"
        status = self.run["status"]
        if status == UNFINISHED:
            m = self.path / "metrics.jsonl"
            fresh = m.exists() and time.time() - m.stat().st_mtime < LIVE_S
            return "running" if fresh else "unfinished"
        return status


def _rid(root: Path, p: Path) -> str:
    # the folder itself is a pipeline (`posttrain studio --runs demo-out`): it goes by its name
    return root.name if p == root else p.relative_to(root).as_posix()


def _is_run(p: Path) -> bool:
    return any((p / m).is_file() for m in RUN_MARKERS)


def scan(root: Path, *, running: set[str] = frozenset()) -> list[Entry]:
    """Every run, pipeline and evaluation under `root` (two levels deep), newest first; `root`
    itself when it is a pipeline (the demo's output folder).

    `running` holds the ids of runs the studio launched and whose process is alive: they are
    "running" whatever their files say.
    """
    root = Path(root).resolve()
    found: list[Entry] = []
    claimed: set[Path] = set()
    candidates = [root] if (root / "lineage.json").is_file() else []
    candidates += sorted(p for p in root.glob("*") if p.is_dir() and p.name != STUDIO_DIR)
    candidates += sorted(p for p in root.glob(f"{STUDIO_DIR}/evals/*") if p.is_dir())
    for p in candidates:
        if (p / "lineage.json").is_file():
            e = Entry(_rid(root, p), "pipeline", p)
            try:
                lin = json.loads((p / "lineage.json").read_text())
            except (OSError, json.JSONDecodeError):
                lin = {}
            for name, st in (lin.get("stages") or {}).items():
                # lineage.json keeps run_dir as the pipeline wrote it (maybe relative to its cwd)
                d = p / name if (p / name).is_dir() else Path(st.get("run_dir") or p / name)
                if d.is_dir() and _is_run(d):
                    e.stages.append(run_entry(root, d, running))
                    claimed.add(d.resolve())
            found.append(e)
        elif (p / "results.json").is_file():
            found.append(_eval_entry(root, p))
        elif (p / "advice.json").is_file():
            found.append(_json_entry(root, p, "advice", "advice.json"))
        elif _is_run(p):
            found.append(run_entry(root, p, running))
        else:  # a folder of runs (runs/group/run)
            for q in sorted(x for x in p.glob("*") if x.is_dir()):
                if (q / "results.json").is_file():
                    found.append(_eval_entry(root, q))
                elif _is_run(q) and q.resolve() not in claimed:
                    found.append(run_entry(root, q, running))
    found = [e for e in found if e.path.resolve() not in claimed or e.kind != "run"]
    return sorted(found, key=lambda e: _mtime(e.path), reverse=True)


def _mtime(p: Path) -> float:
    return max((p / f).stat().st_mtime for f in (*RUN_MARKERS, "results.json", "lineage.json", ".")
               if (p / f).exists())


def run_entry(root: Path, p: Path, running) -> Entry:
    e = Entry(_rid(root, p), "run", p, run=load_run(p.name, p, warn=False))
    if e.rid in running:
        e.run["status"] = "running"
        e.run["glance"]["status"] = "running"
    return e


def _json_entry(root: Path, p: Path, kind: str, name: str) -> Entry:
    try:
        res = json.loads((p / name).read_text())
    except (OSError, json.JSONDecodeError):
        res = {}
    return Entry(_rid(root, p), kind, p, results=res if isinstance(res, dict) else {})


def _eval_entry(root: Path, p: Path) -> Entry:
    return _json_entry(root, p, "eval", "results.json")


def find(root: Path, rid: str, *, running: set[str] = frozenset()) -> Entry:
    """The entry `rid` (a path under `root`); KeyError when it is not a run under `root`."""
    root = Path(root).resolve()
    p = (root / rid).resolve()
    if rid == root.name and not p.exists() and (root / "lineage.json").is_file():
        p = root  # the folder itself is the pipeline
    elif root not in p.parents or not p.is_dir():  # ".." in an id never leaves the folder
        raise KeyError(rid)
    if (p / "lineage.json").is_file():
        return next(e for e in scan(root, running=running) if e.path.resolve() == p)
    if (p / "results.json").is_file():
        return _eval_entry(root, p)
    if (p / "advice.json").is_file():
        return _json_entry(root, p, "advice", "advice.json")
    if _is_run(p):
        return run_entry(root, p, running)
    raise KeyError(rid)
