"""The studio's web app: FastAPI routes over Jinja2 pages and a small JSON API the pages poll.

FastAPI + server-rendered templates + one small script (no build step, no CDN: it works offline)
is the stack `posttrain serve` already uses, so the studio adds no dependency beyond the serve
extra and Jinja2 (which transformers already installs).
"""

from __future__ import annotations

import datetime as _dt
import hmac
import html
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from posttrain.report.groups import FOLDED, group_of, metric_order, splits_of, worth_plotting
from posttrain.report.metrics import series
from posttrain.report.page import fmt, glance_data
from posttrain.report.plots import title_of
from posttrain.report.runs import load_run
from posttrain.report.templates import CSS, environment
from posttrain.stages import STAGES, load_config, schema
from posttrain.studio import catalog, forms
from posttrain.studio.chat import ChatError, Playground, adapter_dir
from posttrain.studio.jobs import Jobs
from posttrain.data.audit import inspect
from posttrain.models.loading import load_tokenizer

HERE = Path(__file__).parent
COOKIE = "posttrain_studio_key"


class Studio:
    """What the routes share: the runs folder, the jobs it launched, the playground's engines."""

    def __init__(self, runs: Path, *, api_key: str | None = None):
        self.runs = Path(runs).resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.jobs = Jobs(self.runs)
        self.playground = Playground()

    def scan(self):
        return catalog.scan(self.runs, running=self.jobs.running())

    def entry(self, rid: str):
        running = self.jobs.running()
        try:
            return catalog.find(self.runs, rid, running=running)
        except KeyError:
            if rid in running:  # launched, and its process has not claimed the directory yet
                return catalog.run_entry(self.runs, self.runs / rid, running)
            return None


def _page(name: str, status_code: int = 200, **ctx) -> HTMLResponse:
    env = environment(str(HERE / "templates"))
    return HTMLResponse(env.get_template(name).render(css=CSS, **ctx), status_code=status_code)


def curves(rows: list[dict]) -> list[dict]:
    """The run page's live curves: groups by meaning, each metric's lines per split (same rules as report.html)."""
    s = {k: v for k, v in series(rows).items() if k != "data"}
    keys = {k for metrics in s.values() for k in metrics}
    groups: dict[str, list] = {}
    for key in metric_order(keys):
        lines = [{"split": split, "steps": s[split][key][0],
                  "values": [v if v == v and abs(v) != float("inf") else None for v in s[split][key][1]]}
                 for split in splits_of(s, key)]
        if worth_plotting([ln["values"] for ln in lines if ln["values"]]) or key == "loss":
            groups.setdefault(group_of(key), []).append({"key": key, "title": title_of(key), "lines": lines})
    return [{"name": g, "metrics": m, "folded": g in FOLDED} for g, m in groups.items()]


def compare_table(entries) -> dict:
    """Rows of (measure, value ± se per column): eval results (the base first) and the runs' headline numbers."""
    columns, rows = [], {}
    base_done = False
    for e in entries:
        if e.kind == "eval":
            cmp = (e.results or {}).get("comparison") or {}
            for r in cmp.get("rows", []):
                key = f"{r['task']} / {r['metric']}"
                if not base_done:
                    rows.setdefault(key, {})["base"] = (r.get("base"), r.get("base_stderr"))
                rows.setdefault(key, {})[e.rid] = (r.get("tuned"), r.get("tuned_stderr"))
            if cmp and not base_done:
                columns.insert(0, "base")
                base_done = True
            if not cmp:  # an evaluation without a baseline: its own scores
                for task, res in ((e.results or {}).get("tuned") or {}).items():
                    if isinstance(res, dict) and isinstance(res.get("value"), (int, float)):
                        rows.setdefault(f"{task}", {})[e.rid] = (res["value"], res.get("stderr"))
        elif e.kind == "pipeline":  # the demo's summary.json: a base row and one row per stage
            summary = _summary(e.path)
            for name, measures in summary.items():
                col = "base" if name == "base" and not base_done else f"{e.rid}: {name}"
                for k, v in measures.items():
                    value, se = (v.get("value"), v.get("stderr")) if isinstance(v, dict) else (v, None)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        rows.setdefault(k, {})[col] = (value, se)
                if col == "base":
                    columns.insert(0, "base")
                    base_done = True
                else:
                    columns.append(col)
            continue
        else:
            for k, v in e.run["glance"]["headline"].items():
                rows.setdefault(k, {})[e.rid] = (v, None)
        columns.append(e.rid)
    table = []
    for key, vals in rows.items():
        ref = vals.get("base") or next((vals[c] for c in columns if c in vals), None)
        cells = []
        for c in columns:
            if c not in vals or vals[c][0] is None:
                cells.append({"text": "–", "delta": ""})
                continue
            v, se = vals[c]
            text = fmt(v) + (f" ± {fmt(se)}" if isinstance(se, (int, float)) else "")
            delta = ""
            if ref is not None and vals[c] is not ref and ref[0] is not None:
                d = v - ref[0]
                both = [x for x in (se, ref[1]) if isinstance(x, (int, float))]
                delta = f"{d:+.3f}" + (f" ± {sum(x * x for x in both) ** 0.5:.3f}" if len(both) == 2 else "")
            cells.append({"text": text, "delta": delta})
        table.append({"measure": key, "cells": cells})
    return {"columns": columns, "rows": table}


def _summary(path: Path) -> dict:
    try:
        s = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in s.items() if isinstance(v, dict)} if isinstance(s, dict) else {}


_MARK = re.compile(r"\[\[(.*?)\]\]", re.S)


def _audit(run_dir: Path) -> dict:
    """`posttrain data inspect` of the run's config: the first example with its loss tokens marked, and the checks."""
    cfg_path = run_dir / "config.yaml"
    stage = load_run(run_dir.name, run_dir, warn=False)["stage"]
    cfg = load_config(stage, cfg_path)
    lines: list[str] = []
    inspect(cfg.data, load_tokenizer(cfg.tokenizer or cfg.model), show=1, limit=50, out=lines.append)
    example = "\n".join(lines[1:-2]) if len(lines) > 3 else ""
    marked = _MARK.sub(lambda m: f"<mark>{m.group(1)}</mark>", html.escape(example))
    return {"title": lines[0] if lines else "", "example_html": marked, "counts": lines[-2:] if lines else []}


def create_app(studio: Studio) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        studio.jobs.stop_all()
        studio.playground.close()

    app = FastAPI(title="posttrain studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if studio.api_key is None:
            return await call_next(request)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
            request.cookies.get(COOKIE) or request.query_params.get("key", "")
        if not hmac.compare_digest(given.encode(), studio.api_key.encode()):
            return JSONResponse({"error": "this studio needs its API key: open it as /?key=KEY once, or send "
                                          "'Authorization: Bearer KEY'"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("key"):  # the browser keeps it for the next pages
            response.set_cookie(COOKIE, studio.api_key, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse)
    async def runs_page():
        entries = studio.scan()
        return _page("runs.html", title="Runs", entries=entries, root=str(studio.runs),
                     glance=lambda e: glance_data([e.run])[0]["g"])

    @app.get("/api/runs")
    async def runs_api():
        return [{"id": e.rid, "kind": e.kind, "status": e.status,
                 "stages": [s.rid for s in e.stages]} for e in studio.scan()]

    @app.get("/runs/{rid:path}", response_class=HTMLResponse)
    async def run_page(rid: str):
        e = studio.entry(rid)
        if e is None:
            return _page("error.html", title="Not found", message=f"no run {rid!r} under {studio.runs}",
                         status_code=404)
        job = studio.jobs.get(rid)
        if e.kind == "run":
            ev = f"{catalog.STUDIO_DIR}/evals/{rid.replace('/', '__')}"
            return _page("run.html", title=rid, e=e, g=glance_data([e.run])[0]["g"], job=job,
                         adapter=adapter_dir(e.path) is not None,
                         evaluation=ev if (studio.runs / ev / "results.json").is_file() else None)
        if e.kind == "advice":
            return _page("advice.html", title=rid, e=e, a=e.results or {})
        if e.kind == "eval":
            return _page("compare.html", title=f"Evaluation {rid}", table=compare_table([e]), selected=[rid],
                         choices=[x.rid for x in studio.scan() if x.kind in ("run", "eval")], job=job)
        return _page("pipeline.html", title=rid, e=e,
                     stages=list(zip(glance_data([s.run for s in e.stages]), e.stages)))

    @app.get("/api/runs/{rid:path}/metrics")
    async def metrics_api(rid: str):
        e = studio.entry(rid)
        if e is None or e.kind != "run":
            return JSONResponse({"error": f"no run {rid!r}"}, status_code=404)
        job = studio.jobs.get(rid)
        steps = [r["step"] for r in e.run["rows"] if isinstance(r.get("step"), int) and r.get("split") == "train"]
        g = glance_data([e.run])[0]["g"]
        return {"status": e.status, "job": job.state() if job else None, "last_step": max(steps, default=None),
                "glance": {k: g[k] for k in ("stage", "model", "started", "duration")},
                "events": len(e.run["rows"]), "groups": curves(e.run["rows"]),
                "log": job.log_tail(2000) if job else ""}

    @app.get("/api/runs/{rid:path}/audit")
    async def audit_api(rid: str):
        e = studio.entry(rid)
        if e is None or e.kind != "run" or not (e.path / "config.yaml").is_file():
            return JSONResponse({"error": f"no run config for {rid!r}"}, status_code=404)
        try:
            return await run_in_threadpool(_audit, e.path)
        except Exception as ex:  # a data file moved since the run, a tokenizer that does not load
            return JSONResponse({"error": f"{type(ex).__name__}: {ex}"}, status_code=422)

    @app.post("/api/runs/{rid:path}/cancel")
    async def cancel_api(rid: str):
        if not studio.jobs.cancel(rid):
            return JSONResponse({"error": f"{rid} is not running (only runs started here can be cancelled)"},
                                status_code=409)
        return {"cancelled": rid}

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request):
        selected = request.query_params.getlist("run")
        entries = [e for e in (studio.entry(r) for r in selected) if e is not None and e.kind in ("run", "eval", "pipeline")]
        entries_all = studio.scan()
        choices = [e.rid for e in entries_all if e.kind in ("run", "eval", "pipeline")]
        choices += [s.rid for e in entries_all if e.kind == "pipeline" for s in e.stages]  # a pipeline's runs
        return _page("compare.html", title="Compare", table=compare_table(entries) if entries else None,
                     selected=[e.rid for e in entries], choices=choices, job=None)

    @app.post("/api/evaluate/{rid:path}")
    async def evaluate_api(rid: str, request: Request):
        """Evaluate a finished run against its base model: `posttrain eval --baseline`, in the background."""
        e = studio.entry(rid)
        if e is None or e.kind != "run" or e.status != "completed":
            return JSONResponse({"error": f"{rid}: only a completed run can be evaluated"}, status_code=409)
        body = await request.json() if request.headers.get("content-type", "").startswith("application/json") else {}
        base = e.run["model"]
        out = f"{catalog.STUDIO_DIR}/evals/{rid.replace('/', '__')}"  # the run page links it back
        studio.jobs.evaluate(out, str(e.path), base, suite=str(body.get("suite") or "regression"),
                             limit=body.get("limit") or 20)
        return {"eval": out}

    @app.get("/api/jobs/{rid:path}")
    async def job_api(rid: str):
        job = studio.jobs.get(rid)
        if job is None:
            return JSONResponse({"error": f"no job {rid!r}"}, status_code=404)
        return {"state": job.state(), "log": job.log_tail(2000)}

    @app.get("/launch", response_class=HTMLResponse)
    async def launch_page(stage: str = "sft", advice: str | None = None):
        notes: list[str] = []
        values: dict[str, str] = {}
        if advice is not None:  # an adviser result's recipe fills the form
            e = studio.entry(advice)
            if e is None or e.kind != "advice":
                return _page("error.html", title="Launch", message=f"no adviser result {advice!r}", status_code=404)
            try:
                stage, values, notes = forms.from_recipe(e.path / "advice.yaml")
            except (OSError, ValueError) as ex:
                return _page("error.html", title="Launch", message=str(ex), status_code=422)
            values.pop("output_dir", None)
        if stage not in STAGES:
            return _page("error.html", title="Launch", message=f"unknown stage {stage!r}; known: "
                         f"{', '.join(sorted(STAGES))}", status_code=404)
        return _launch_form(stage, values, {}, notes=notes)

    def _launch_form(stage, values, errors, status_code=200, notes=()):
        default_out = f"{stage}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        values = {"output_dir": default_out, **values}
        return _page("launch.html", title="Launch", stage=stage, stages=sorted(STAGES), values=values, errors=errors,
                     groups=forms.form_fields(stage), doc=(schema(stage).__doc__ or "").strip(),
                     notes=list(notes), status_code=status_code)

    @app.post("/launch")
    async def launch_submit(request: Request):
        form = {k: str(v) for k, v in (await request.form()).items()}
        stage = form.pop("_stage", "sft")
        if stage not in STAGES:
            return _page("error.html", title="Launch", message=f"unknown stage {stage!r}", status_code=400)
        overrides = forms.overrides_from_form(stage, form)
        out = form.get("output_dir", "").strip()
        errors = {}
        target = (studio.runs / out).resolve() if out else None
        if not out or target is None or studio.runs not in target.parents:
            errors["output_dir"] = [f"output_dir: must be a folder name under {studio.runs}, got {out!r}"]
        elif (target / "manifest.json").exists() or (target / "config.yaml").exists():
            errors["output_dir"] = [f"output_dir: {out} already holds a run; pick a new name"]
        cfg, cfg_errors = forms.validate(stage, overrides)
        known = {f.key for f in forms.fields_of(schema(stage))}
        for key, lines in cfg_errors.items():  # an error of a key that has no field is shown at the top
            errors.setdefault(key if key in known else "", []).extend(lines)
        if errors:
            return _launch_form(stage, form, errors, status_code=422)
        rid = target.relative_to(studio.runs).as_posix()
        overrides = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={rid}"]
        try:
            studio.jobs.launch(stage, overrides, rid)
        except (ValueError, OSError) as ex:  # already running here; the runs folder not writable
            return _launch_form(stage, form, {"": [str(ex)]}, status_code=409)
        return RedirectResponse(f"/runs/{rid}", status_code=303)

    @app.get("/playground", response_class=HTMLResponse)
    async def playground_page(run: str | None = None):
        runs = [e for e in studio.scan() if e.kind == "run" and adapter_dir(e.path) is not None]
        return _page("playground.html", title="Playground", runs=runs, selected=run)

    @app.post("/api/chat")
    async def chat_api(request: Request):
        body = await request.json()
        e = studio.entry(str(body.get("run", "")))
        if e is None or e.kind != "run" or adapter_dir(e.path) is None:
            return JSONResponse({"error": f"run {body.get('run')!r}: no adapter to chat with (a finished run "
                                          "with adapter.type set)"}, status_code=404)
        conv = body.get("conversations")
        if not isinstance(conv, dict) or set(conv) - {"base", "adapter"}:
            return JSONResponse({"error": "conversations: expected {base: [messages], adapter: [messages]}"},
                                status_code=422)
        try:
            answers = await run_in_threadpool(
                studio.playground.answer, e.run["model"],
                {("base" if k == "base" else e.rid): v for k, v in conv.items()},
                adapters={e.rid: adapter_dir(e.path)}, max_tokens=int(body.get("max_tokens", 64)),
                temperature=float(body.get("temperature", 0.0)))
        except (ChatError, ValueError) as ex:
            return JSONResponse({"error": str(ex)}, status_code=422)
        except Exception as ex:  # the base model or the adapter does not load (moved, a hub name offline)
            return JSONResponse({"error": f"could not answer with {e.run['model']}: {type(ex).__name__}: {ex}"},
                                status_code=500)
        return {"base": answers.get("base"), "adapter": answers.get(e.rid), "model": e.run["model"]}

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app

