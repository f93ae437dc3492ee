"""`posttrain pipeline recipe.yaml`: stages in order, each starting from the previous one's output, with lineage.

    from posttrain.pipeline import load_recipe, run_pipeline
    lineage = run_pipeline(load_recipe("recipe.yaml"))

See docs/pipeline.md.
"""

from posttrain.pipeline.measures import MEASURES, register_measure
from posttrain.pipeline.recipe import Recipe, RecipeError, load_recipe, order_warnings
from posttrain.pipeline.runner import PipelineError, run_pipeline

__all__ = ["MEASURES", "PipelineError", "Recipe", "RecipeError", "load_recipe", "order_warnings", "register_measure",
           "run_pipeline"]


def main(argv: list[str]) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="posttrain pipeline", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML (see docs/pipeline.md; `posttrain demo --print-recipe` prints one)")
    p.add_argument("overrides", nargs="*", help="output_dir=DIR or STAGE_NAME.key=value, e.g. sft.train.lr=1e-4")
    p.add_argument("--only", default=None, help="comma-separated stage names (plus the stages they depend on)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print the plan and warnings, run nothing")
    p.add_argument("--jobs", default=None,
                   help="independent stages at once, each in its own process: a number or auto (one per GPU, two "
                        "on a CPU with two cores or more); default: the recipe's jobs, else 1")
    a = p.parse_intermixed_args(argv)
    recipe = load_recipe(a.recipe, a.overrides + ([f"jobs={a.jobs}"] if a.jobs is not None else []))
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    if a.dry_run:
        from posttrain.pipeline.runner import _parents, needed_stages

        parents = _parents(recipe)
        for w in order_warnings(recipe):
            print(f"posttrain: warning: {w}", file=sys.stderr)
        from posttrain.pipeline import schedule
        from posttrain.pipeline.recipe import stage_refs

        todo = needed_stages(recipe, only)
        for s in todo:
            print(f"{s.name}: {s.stage} from {parents[s.name] or s.model or 'the recipe model'} ({s.start_from}) -> "
                  f"{recipe.output_dir / s.name}")
        deps = schedule.dependencies(todo, parents, stage_refs)
        w = schedule.width(todo, deps)
        n = schedule.resolve_jobs(recipe.jobs, w)
        print(f"jobs: {n} (the recipe says {recipe.jobs}; at most {w} of these stages can run at once)")
        return 0
    lineage = run_pipeline(recipe, only=only)
    print(format_lineage(lineage))
    print(f"\nlineage: {recipe.output_dir / 'lineage.json'}; report: {recipe.output_dir / 'report.html'}")
    return 0


def format_lineage(lineage: dict) -> str:
    rows = [("stage", "status", "regression_delta", "measures")]
    if lineage.get("base"):
        rows.append(("base", "", "", _fmt(lineage["base"]["metrics"])))
    for name, e in lineage["stages"].items():
        rows.append((name, e.get("status", ""), str(e.get("regression_delta", "")), _fmt(e.get("measures") or {})))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0].ljust(w[0])}  {r[1].ljust(w[1])}  {r[2].ljust(w[2])}  {r[3]}" for r in rows)


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in m.items() if k != "eval_time_s")
