"""`posttrain demo`: the post-training stack on the bundled base model, offline, on a CPU.

The demo is a pipeline recipe shipped in the package (`gym/recipes/demo.yaml`, the one source of
every demo setting: tests and benchmarks read their overrides from it, `stage_overrides`; print it with
`posttrain demo --print-recipe`). It runs the stages named in `--stages` (default: every row)
through `posttrain.pipeline`, measures each on the same held-out gym split (task accuracy) and
the same regression set (general skills the base already has), prints the before/after table and
writes `summary.json` and `report.html`. A row is a recipe stage plus its measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from posttrain import gym
from posttrain.pipeline import forgetting
from posttrain.pipeline.recipe import SIDE_STAGES, RecipeError, load_recipe, parse_jobs
from posttrain.pipeline.runner import run_pipeline
from posttrain.report import build_report
from posttrain.report.table import format_summary_table

RECIPE = Path(gym.__file__).resolve().parent / "recipes" / "demo.yaml"


def recipe_text(path: Path = RECIPE) -> str:
    return Path(path).read_text()


def _raw_recipe(path: Path = RECIPE) -> dict:
    return yaml.safe_load(recipe_text(path))


def all_stages(path: Path = RECIPE) -> tuple[str, ...]:
    """The rows the demo can show: base, then every recipe stage that is not a side stage."""
    return ("base", *(s["name"] for s in _raw_recipe(path)["stages"] if s["stage"] not in SIDE_STAGES))


ALL_STAGES = all_stages()
# rows the recipe may hold that run only when `--stages` names them: the unguarded reasoning chain
# (`--forgetting` runs it beside the guarded one), multi-turn tool RL, distillation
OPTIONAL_ROWS = ("reasoning_unguarded", "grpo_unguarded", "lookup_sft", "lookup", "distill")


# `--forgetting`'s second table: the guarded reasoning chain (default rows) beside the unguarded one
FORGETTING_ROWS = ("base", "reasoning", "grpo", "reasoning_unguarded", "grpo_unguarded")


def default_stages(path: Path = RECIPE) -> tuple[str, ...]:
    """The rows `posttrain demo` runs without `--stages`: every row but the optional ones."""
    return tuple(s for s in all_stages(path) if s not in OPTIONAL_ROWS)


# every row but the optional ones by default (docs/pipeline.md has the times); --stages base,sft is the
# 1-2 min version
DEFAULT_STAGES = default_stages()


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


def stage_overrides(name: str, *, data: bool = False, path: Path = RECIPE) -> list[str]:
    """The demo recipe's stage `name` as dotted `key=value` overrides (without its name, stage, model
    and `from`; without data.train / data.eval unless `data`): how tests and benchmarks reuse a row's
    settings instead of keeping a copy that drifts."""
    stage = next((s for s in _raw_recipe(path)["stages"] if s["name"] == name), None)
    if stage is None:
        raise KeyError(f"the demo recipe has no stage {name!r}")
    out = _dotted({k: v for k, v in stage.items() if k not in ("name", "stage", "model", "from", "measures")})
    return out if data else [o for o in out if not o.startswith(("data.train=", "data.eval="))]


SFT_OVERRIDES = stage_overrides("sft")  # bench/preference_gym.py and the gym tests start from the same SFT


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# a row whose regression score falls more than this below the base's is flagged (the guard's 2 points, docs/eval.md)
REGRESSION_LIMIT = 0.02


def format_table(summary: dict) -> str:
    """The closing table in at most 100 columns (`report.table`), each row's regression delta against
    the base beside it, a line naming every row that forgot more than `REGRESSION_LIMIT`, and one
    line per row the forgetting guard stopped (the reason as the run gave it)."""
    table = format_summary_table(summary)
    flagged = [f"{name} ({row['regression_delta']:+.3f})" for name, row in summary.items()
               if row.get("regression_delta", 0.0) < -REGRESSION_LIMIT]
    if flagged:
        table += (f"\nforgetting: regression fell more than {REGRESSION_LIMIT:.2f} below the base in "
                  + ", ".join(flagged) + " (posttrain demo --forgetting shows the guard; docs/eval.md)")
    for name, row in summary.items():
        if row.get("stop_reason"):
            table += f"\nstopped: {name}: {row['stop_reason']}"
    return table


def run_demo(out: Path, *, stages=DEFAULT_STAGES, n_task: int = 200, n_reg: int = 200, extra_overrides: tuple = (),
             recipe: Path = RECIPE, jobs=None) -> dict:
    """Run the demo recipe's `stages` into `out`; returns {row: {metric: value}} (also summary.json).

    `extra_overrides` are pipeline overrides (`sft.train.max_steps=20`). Stages already completed
    in `out` with the same recipe are skipped (the pipeline's keys), so a second run only adds rows.
    `jobs` overrides the recipe's `jobs` (the shipped recipe: auto, so independent rows run at once).
    """
    torch.manual_seed(0)
    t_all = time.time()
    out = Path(out)
    raw = _raw_recipe(recipe)
    raw["output_dir"] = str(out)
    raw.setdefault("eval", {})["n"] = n_reg
    for m in raw["eval"].get("measures", []):
        if m.get("measure") == "task_accuracy":
            m.setdefault("args", {})["n"] = n_task
    rec = load_recipe(raw, list(extra_overrides))
    only = [s for s in stages if s != "base"]
    lin = run_pipeline(rec, only=only, report=False, jobs=jobs)  # only=[]: the base measurement alone
    summary: dict[str, dict] = {}
    if "base" in stages:
        summary["base"] = dict(lin["base"]["metrics"])
    runs: dict[str, Path] = {}
    for name in only:
        e = lin["stages"][name]
        row = dict(e.get("measures") or {})
        row["train_time_s"] = e.get("train_time_s")
        loss = _last(Path(e["run_dir"]), "train", "loss")
        if loss == loss:  # not NaN: the stage logs a training loss
            row["final_train_loss"] = round(loss, 4)
        if "regression_score" in row and "regression_score" in summary.get("base", {}):
            row["regression_delta"] = round(row["regression_score"] - summary["base"]["regression_score"], 4)
        # the forgetting guard's last drift from the stage's start, and why it stopped the run, if it did
        if "guard.drift_kl" in e.get("metrics", {}):
            row["drift_kl"] = round(e["metrics"]["guard.drift_kl"], 3)
        stop = _stop_reason(Path(e["run_dir"]))
        if stop:
            row["stop_reason"] = stop
        summary[name] = row
        runs[name] = Path(e["run_dir"])
        _say(f"[demo] {name}: {row}")

    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    build_report([] if runs else [out], out / "report.html", title="posttrain demo", summary=summary,
                 stages=runs or None)
    wall = time.time() - t_all
    print(format_table(summary))
    print(f"\nwall time: {wall:.0f} s; summary: {summary_path}; report: {out / 'report.html'}; "
          f"lineage: {out / 'lineage.json'}")
    print(f"look at the runs, compare them and chat with the adapters: posttrain studio --runs {out}")
    return summary


def _stop_reason(run_dir: Path) -> str:
    """Why the run stopped before its last step (the forgetting guard, early stopping), or ''."""
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        return ""
    return (json.loads(manifest.read_text()).get("result") or {}).get("stop_reason") or ""


def _last(run_dir: Path, split: str, key: str) -> float:
    val = float("nan")
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == split and key in rec:
            val = rec[key]
    return val


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    optional = [s for s in ALL_STAGES if s in OPTIONAL_ROWS]
    p.add_argument("--stages", default=None,
                   help=f"comma-separated rows among {','.join(ALL_STAGES)} (default: {','.join(DEFAULT_STAGES)}; "
                        f"optional rows, run only when named: {','.join(optional) or 'none in this recipe'})")
    p.add_argument("--recipe", default=None, help="run the demo from this recipe instead of the shipped one")
    p.add_argument("--print-recipe", action="store_true", help="print the demo's pipeline recipe and exit")
    p.add_argument("--jobs", default=None,
                   help="independent rows at once, each in its own process: a number or auto (the recipe's default: "
                        "one per GPU, two on a CPU with two cores or more); 1 runs every row in this process")
    p.add_argument("--forgetting", action="store_true",
                   help="instead: show catastrophic forgetting: a naive vs a guarded fine-tune (docs/eval.md), then "
                        "the unguarded reasoning chain beside the guarded one (OUT/reasoning-chains, docs/pipeline.md)")
    a = p.parse_args(argv)
    if a.print_recipe:
        print(recipe_text(), end="")
        return 0
    if a.forgetting:
        forgetting.run(Path(a.out))
        run_demo(Path(a.out) / "reasoning-chains", stages=FORGETTING_ROWS)
        return 0
    recipe = Path(a.recipe) if a.recipe else RECIPE
    available = all_stages(recipe)
    stages = (tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages is not None
              else default_stages(recipe))
    unknown = set(stages) - set(available)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; available: {', '.join(available)}")
    try:
        jobs = None if a.jobs is None else parse_jobs(a.jobs.strip(), "--jobs")
    except RecipeError as e:
        p.error(str(e))
    run_demo(Path(a.out), stages=stages, recipe=recipe, jobs=jobs)
    return 0
