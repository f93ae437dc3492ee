"""Run a recipe's stages in order, skip what is already done, and keep the lineage.

Each stage is keyed by a hash of its resolved config (output_dir left out), the content of every
file its config names, and the key of what it starts from (the previous stage's key, or the
starting model's files). A re-run skips a stage whose key matches a completed run, resumes one
that failed with the same key from its checkpoints, and re-runs (after moving the old folder to
`.superseded/`) one whose key changed. Keys chain, so changing a stage re-runs everything after it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

from posttrain.config import dump_config
from posttrain.pipeline import measures as M
from posttrain.pipeline import schedule
from posttrain.pipeline.recipe import (BASE, EVAL_STAGE, SIDE_STAGES, Recipe, StageSpec, build_stage_config,
                                       order_warnings, parse_jobs, stage_refs, substitute)
from posttrain import gym, stages
from posttrain.data.sources import parse_gym
from posttrain.engine.run import file_hash, read_manifest
from posttrain.eval.runner import evaluate
from posttrain.models import adapters
from posttrain.models.loading import load
from posttrain.report import build_report

LINEAGE = "lineage.json"
HASH_FILES_UP_TO = 256 << 20  # larger files enter a key by size and mtime, not content


class PipelineError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_identity(p: Path) -> str:
    """Content identity: a file's sha256 (as in run manifests); a folder's hash over its files' names and hashes."""
    def one(f: Path) -> str:
        st = f.stat()
        return file_hash(f) if st.st_size <= HASH_FILES_UP_TO else f"size {st.st_size} mtime {st.st_mtime_ns}"

    if p.is_file():
        return one(p)
    h = hashlib.sha256()
    for f in sorted(f for f in p.rglob("*") if f.is_file() and ".tmp-" not in str(f)):
        h.update(f"{f.relative_to(p)}\0{one(f)}\0".encode())
    return h.hexdigest()[:16]


def _inputs_identity(tree) -> dict:
    """Every string in a config that names an existing file or folder, with its content identity.

    `gym:` sources are generated on the fly: their identity is the hash of the generated rows.
    """
    found: dict = {}

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and node:
            if node.startswith("gym:"):
                found[node] = _gym_identity(node)
            elif len(node) < 4096 and Path(node).exists():
                found[node] = path_identity(Path(node))

    walk(tree)
    return found


def _gym_identity(spec: str) -> str:

    try:
        task, split = parse_gym(spec)
        rows = gym.load_task_rows(task, split)
    except ValueError:  # not a valid source: the stage itself will say so
        return "invalid"
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def resolve_model(name: str) -> str:
    if name == "gym:base":

        return str(gym.base_model_path())
    return name


def _model_key(name: str) -> str:
    p = Path(name)
    return path_identity(p) if p.exists() else f"hub:{name}"


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (created if missing) across processes; a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: only jobs: 1 writes there
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Lineage:
    """lineage.json: written after every change, so a crash leaves an accurate record.

    Stages that run at once (`jobs`) each hold a Lineage of the same file: `set_stage` re-reads the
    file under a lock and changes only its own stage, so no process overwrites another's entry."""
    def __init__(self, out: Path):
        self.path = out / LINEAGE
        self.lock = out / ".lineage.lock"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def set_stage(self, name: str, entry: dict) -> None:
        with _locked(self.lock):
            if self.path.exists():
                self.data["stages"] = json.loads(self.path.read_text()).get("stages", {})
            self.data["stages"][name] = entry
            self._write()

    def save(self) -> None:
        with _locked(self.lock):
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.rename(self.path)


def needed_stages(recipe: Recipe, only: Optional[Iterable[str]]) -> list[StageSpec]:
    """The stages to run: all, or `only` plus every stage they depend on."""
    if only is None:
        return list(recipe.stages)
    by_name = {s.name: s for s in recipe.stages}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise PipelineError(f"{recipe.path}: no stage named {unknown}; stages: {', '.join(by_name)}")
    parents = _parents(recipe)
    need: set[str] = set()
    todo = list(only)
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need.add(n)
        todo += [p for p in [parents[n]] if p] + stage_refs(by_name[n].section)
    return [s for s in recipe.stages if s.name in need]


def _parents(recipe: Recipe) -> dict[str, Optional[str]]:
    """Each stage's starting policy: `from`, else the closest earlier policy stage (None = the model)."""
    out, last = {}, None
    for s in recipe.stages:
        out[s.name] = None if s.source == BASE else (s.source or last)
        if s.stage not in SIDE_STAGES and s.stage != EVAL_STAGE:
            last = s.name
    return out


def run_pipeline(recipe: Recipe, *, only: Optional[Iterable[str]] = None, report: bool = True,
                 on_stage: Optional[Callable[[str, dict], None]] = None, jobs: Optional[int | str] = None) -> dict:
    """Run (or resume) `recipe`; returns the lineage dict also written to `output_dir/lineage.json`.

    `jobs` (default: the recipe's `jobs`, itself 1 by default): how many independent stages may run at
    once, each in a worker process (pipeline/schedule.py); 1 runs every stage in this process."""
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    lin = Lineage(out)
    # stages no longer in the recipe leave lineage (their folders stay)
    lin.data["stages"] = {n: e for n, e in lin.data["stages"].items() if n in {s.name for s in recipe.stages}}
    warnings = order_warnings(recipe)
    for w in warnings:
        print(f"posttrain: warning: {w}", file=sys.stderr, flush=True)
    first = recipe.stages[0]
    model0 = resolve_model(first.model) if first.model else None
    lin.data.update(recipe=recipe.raw, recipe_path=recipe.path, warnings=warnings, output_dir=str(out),
                    base_model={"model": model0, "key": _model_key(model0) if model0 else None})
    lin.save()
    ev = recipe.eval
    ev_key = _sha(ev.model_dump())
    base_metrics: dict = {}
    if model0 and (ev.base or ev.regression):
        key = _sha([lin.data["base_model"]["key"], ev_key])
        cached = lin.data.get("base")
        if cached and cached.get("key") == key:
            base_metrics = cached["metrics"]
        else:
            _say(f"base: measuring {model0}")
            base_metrics = _measure({"model": model0, "adapter": None}, ev, [])
            lin.data["base"] = {"key": key, "metrics": base_metrics}
            lin.save()
    parents = _parents(recipe)
    policies: dict[Optional[str], dict] = {None: {"model": model0, "adapter": None, "key": lin.data["base_model"]["key"]}}
    published: dict[str, dict] = {}

    def done(s: StageSpec, entry: dict) -> None:
        if s.stage not in SIDE_STAGES and s.stage != EVAL_STAGE:
            policies[s.name] = entry["policy"]
        published[s.name] = entry
        if on_stage:
            on_stage(s.name, entry)

    todo = needed_stages(recipe, only)
    deps = schedule.dependencies(todo, parents, stage_refs)
    jobs = recipe.jobs if jobs is None else parse_jobs(jobs, "run_pipeline(jobs=...)")
    n_jobs = schedule.resolve_jobs(jobs, schedule.width(todo, deps))
    if n_jobs == 1:
        for s in todo:
            done(s, _stage_job(s, policies[parents[s.name]], parents[s.name], out, ev, ev_key, published,
                               base_metrics, lin))
    else:
        _check_importable(todo, ev)
        _say(f"running up to {n_jobs} independent stages at once (jobs: {jobs})")
        schedule.run_parallel(
            todo, deps, schedule.ranks(todo, deps, _cost), n_jobs, _stage_job,
            lambda s: (s, policies[parents[s.name]], parents[s.name], out, ev, ev_key, published, base_metrics),
            on_done=done, on_failed=lambda s, e: _say(f"{s.name}: failed: {type(e).__name__}: {e}"))
        lin = Lineage(out)  # the workers wrote their stages
    if report:
        write_report(recipe, lin)
    return lin.data


def _stage_job(s: StageSpec, start: dict, parent: Optional[str], out: Path, ev, ev_key: str, published: dict,
               base_metrics: dict, lin: Optional[Lineage] = None) -> dict:
    """One stage, trained or evaluated, in this process or in a worker (which opens the lineage itself)."""
    lin = lin or Lineage(out)
    if s.stage == EVAL_STAGE:
        return _eval_step(s, start, out, lin, parent)
    return _train_step(s, start, parent, out, lin, ev, ev_key, published, base_metrics)


def _cost(s: StageSpec) -> float:
    """The scheduler's weight of a stage: its optimizer steps (100 when unset; 1 for an eval stage)."""
    if s.stage == EVAL_STAGE:
        return 1.0
    return float(getattr(getattr(s.cfg, "train", None), "max_steps", None) or 100)


def _check_importable(todo: list[StageSpec], ev) -> None:
    """Workers are fresh interpreters: a measure defined in a script or a function body is not there."""
    for s in todo:
        for spec in [*ev.measures, *s.measures]:
            fn = M.MEASURES.get(spec.measure)
            if fn is not None and (fn.__module__ == "__main__" or "<locals>" in fn.__qualname__):
                raise PipelineError(f"{s.where}: measure '{spec.measure}' is defined in {fn.__module__} "
                                    f"({fn.__qualname__}), which a worker process cannot import; run with jobs: 1, "
                                    "or register it from an importable module")


def _start_config(s: StageSpec, start: dict, parent: Optional[str], out: Path, published: dict) -> tuple:
    """The stage's config with its starting model filled in, and the same tree with identities for hashing."""
    refs = {r: published[r]["output"]["model_dir"] for r in stage_refs(s.section)}
    tree = substitute(s.section, refs)
    ident = substitute(s.section, {r: f"<stage {r} {published[r]['key']}>" for r in refs})
    adapter_tree = dict(tree.get("adapter") or {})
    if start["adapter"] and s.start_from == "adapter":
        if adapter_tree.get("type", "none") == "none":
            raise PipelineError(f"{s.where}: start_from: adapter continues the previous stage's adapter; set "
                                "adapter.type (e.g. lora), or use start_from: merged")
        if adapter_tree.get("path"):
            raise PipelineError(f"{s.where}: start_from: adapter sets adapter.path itself; remove adapter.path")
        tree["adapter"] = {**adapter_tree, "path": start["adapter"]}
        tree["model"] = start["model"]
    elif start["adapter"]:
        tree["model"] = str(_merged(start, out / parent))
    else:
        tree["model"] = start["model"]
    tree["output_dir"] = str(out / s.name)
    ident = {**ident, "model": f"<input {start['key']}>", "start_from": s.start_from}
    return tree, ident


def _merged(start: dict, parent_dir: Path) -> Path:
    """The parent adapter merged into its base, once, beside the parent run (keyed by the parent's key)."""
    final = parent_dir / "merged"
    stamp = final / "posttrain-merged-from.json"
    with _locked(parent_dir / ".merge.lock"):  # two stages starting from this one at once merge it once
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == start["key"]:
            return final
        tmp = parent_dir / ".tmp-merged"
        shutil.rmtree(tmp, ignore_errors=True)
        adapters.merge_to_dir(start["model"], start["adapter"], tmp)
        (tmp / stamp.name).write_text(json.dumps({"key": start["key"], "base": start["model"],
                                                  "adapter": start["adapter"]}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def _train_step(s: StageSpec, start: dict, parent, out: Path, lin: Lineage, ev, ev_key: str, published: dict,
                base_metrics: dict) -> dict:

    tree, ident = _start_config(s, start, parent, out, published)
    cfg = build_stage_config(s, tree, "recipe")
    hashed = json.loads(json.dumps(cfg.model_dump(mode="json")))
    hashed.pop("output_dir", None)
    # what the stage starts from is identified by its key, not by the path it happens to have
    hashed["model"] = ident["model"]
    if start.get("adapter") and (tree.get("adapter") or {}).get("path") == start["adapter"]:
        hashed["adapter"]["path"] = ident["model"]
    files = _inputs_identity(hashed)
    measures_spec = [m.model_dump() for m in s.measures]
    key = _sha({"config": hashed, "files": files, "refs": {k: v for k, v in ident.items() if k != "model"},
                "input": start["key"], "measures": measures_spec, "eval": ev_key})
    run_dir = out / s.name
    old = lin.stage(s.name)
    manifest = read_manifest(run_dir)
    if old.get("key") == key and old.get("status") == "completed" and (manifest or {}).get("status") == "completed":
        _say(f"{s.name}: unchanged (key {key}), skipped")
        return old
    resume = False
    if run_dir.exists():
        has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        if old.get("key") == key and (manifest or {}).get("status") != "completed" and has_ckpt:
            resume = True
            _say(f"{s.name}: resuming the unfinished run from its checkpoints")
        else:
            dest = out / ".superseded" / f"{s.name}-{old.get('key', 'unknown')}-{int(time.time())}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(dest)
            _say(f"{s.name}: config or inputs changed; the previous run moved to {dest}")
    entry = {"stage": s.stage, "status": "running", "key": key, "config_hash": _sha(dump_config(cfg)),
             "started_from": parent or "model", "start_from": s.start_from,
             "inputs": {"model": tree["model"], "adapter": (tree.get("adapter") or {}).get("path"),
                        "input_key": start["key"], "files": files, "stage_refs": {r: published[r]["output"]["model_dir"]
                                                                                  for r in stage_refs(s.section)}},
             "run_dir": str(run_dir), "resumed": resume}
    lin.set_stage(s.name, entry)
    _say(f"{s.name}: running stage {s.stage} from {parent or 'the starting model'}")
    t0 = time.time()
    entry["started_at"] = round(t0, 3)
    try:
        res = stages.get(s.stage).run(cfg, resume=resume)
    except BaseException as e:
        lin.set_stage(s.name, {**entry, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise PipelineError(f"{s.where} failed: {type(e).__name__}: {e}\nFix it and run the pipeline again: completed "
                            "stages are skipped, and this one resumes (same key) or restarts (changed config).") from e
    adapter_run = cfg.adapter.type != "none"
    policy = ({"model": cfg.model, "adapter": str(res.model_dir), "key": key} if adapter_run
              else {"model": str(res.model_dir), "adapter": None, "key": key})
    entry.update(status="completed", train_time_s=round(time.time() - t0, 1), policy=policy,
                 output={"run_dir": str(run_dir), "model_dir": str(res.model_dir),
                         "kind": "adapter" if adapter_run else "model"},
                 metrics=_train_metrics(res.result))
    if s.stage not in SIDE_STAGES:
        res.model.eval()
        entry["measures"] = _measure(policy, ev, s.measures, model=res.model, tokenizer=res.tokenizer)
        reg, base_reg = entry["measures"].get("regression_score"), base_metrics.get("regression_score")
        if reg is not None and base_reg is not None:
            entry["regression_delta"] = round(reg - base_reg, 4)
    del res
    entry["finished_at"] = round(time.time(), 3)
    lin.set_stage(s.name, entry)
    _say(f"{s.name}: done; {entry.get('measures', {})}")
    return entry


def _train_metrics(result: dict) -> dict:
    """The run's final numbers (manifest `result`), one level deep."""
    flat = {}
    for k, v in (result or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[k] = v
        elif isinstance(v, dict) and k not in ("data", "distributed"):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))
                         and not isinstance(vv, bool)})
    return flat


def _measure(policy: dict, ev, extra, *, model=None, tokenizer=None) -> dict:
    if model is None:

        model, tokenizer = load(policy["model"], adapter=policy["adapter"], device="auto")
        model.eval()
    t0 = time.time()
    m = M.regression(model, tokenizer, ev.regression, ev.n)
    for spec in [*ev.measures, *extra]:
        m.update(M.run_measure(spec.measure, model, tokenizer, spec.args, spec.name))
    m["eval_time_s"] = round(time.time() - t0, 1)
    return m


def _eval_step(s: StageSpec, start: dict, out: Path, lin: Lineage, parent) -> dict:
    key = _sha({"eval": s.cfg.model_dump(), "input": start["key"], "measures": [m.model_dump() for m in s.measures]})
    old = lin.stage(s.name)
    if old.get("key") == key and old.get("status") == "completed":
        _say(f"{s.name}: unchanged (key {key}), skipped")
        return old

    _say(f"{s.name}: evaluating {parent or 'the starting model'} on suite {s.cfg.suite}")
    res = evaluate(start["model"], adapter=start["adapter"], suite=s.cfg.suite, limit=s.cfg.limit,
                   out=out / s.name, verbose=False)
    score = (res["tuned"].get("score") or {}).get("value")
    entry = {"stage": EVAL_STAGE, "status": "completed", "key": key, "started_from": parent or "model",
             "inputs": {"model": start["model"], "adapter": start["adapter"], "input_key": start["key"]},
             "output": {"run_dir": str(out / s.name), "results": str(out / s.name / "results.json")},
             "measures": {f"{s.cfg.suite}_score" if score is not None else "score": score}, "policy": start}
    lin.set_stage(s.name, entry)
    return entry


def write_report(recipe: Recipe, lin: Lineage) -> Path:
    """One page with every stage side by side: the measurement table and the training curves."""
    summary, runs = {}, {}
    if lin.data.get("base"):
        summary["base"] = dict(lin.data["base"]["metrics"])
    for s in recipe.stages:
        e = lin.stage(s.name)
        if e.get("status") != "completed":
            continue
        row = {k: v for k, v in (e.get("measures") or {}).items() if isinstance(v, (int, float))}
        if "regression_delta" in e:
            row["regression_delta"] = e["regression_delta"]
        if row:
            summary[s.name] = row
        if s.stage != EVAL_STAGE and (Path(e["run_dir"]) / "metrics.jsonl").exists():
            runs[s.name] = e["run_dir"]
    out = recipe.output_dir / "report.html"
    build_report([], out, title=f"pipeline {recipe.output_dir.name}", summary=summary or None,
                 stages=runs or None) if runs else build_report([recipe.output_dir], out, summary=summary or None)
    return out
