"""The failure mode, shown: a naive fine-tune forgets, a guarded one does not.

Two fine-tunes of the bundled base model on the same narrow gym data (chat instructions):

- naive: full fine-tuning, a high learning rate (1e-3), many epochs (10), nothing watching (`eval.guard=off`);
- guarded: LoRA at the default adapter learning rate, 20% general text mixed in (`data.mix`
  with 600 rows of the gym's plain-text regression skills, train split), early stopping on held-out
  loss, and the forgetting guard (regression suite every `guard_every` steps, stop and roll back
  past `max_drop`).

Both are measured on the same held-out numbers: target accuracy (gym instruct, test split) and
the regression suite score (posttrain.eval built-in `regression`, whose `regression-gen` task is
exactly `gym.regression_score`). Both runs log the target and regression metrics over steps, so
their report plots show when forgetting sets in.

    python -c "from posttrain.pipeline import forgetting; forgetting.run('forgetting-out')"
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Union
from posttrain import gym
from posttrain.eval.runner import run_suite
from posttrain.stages import load_config, sft
from posttrain.eval.guard import regression_guard
from posttrain.engine.setup import load_for_training
from posttrain.models.loading import load
from posttrain.report import build_report

# nothing watching: the default drift guard (eval.guard) would stop this run, which is the point of the other one
NAIVE = ["adapter.type=none", "train.lr=1e-3", "train.epochs=10", "train.schedule=constant", "train.warmup_steps=5",
         "eval.guard=off"]
GUARDED = ["adapter.type=lora", "adapter.r=16", "train.epochs=3", "train.warmup_steps=10",
           "data.mix.ratio=0.2", "train.early_stopping_patience=3"]  # + data.mix.data=<general file>
COMMON = ["train.batch_size=16", "data.max_length=256", "train.progress=false", "train.precision=fp32"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model, tok, *, n_task: int = 100, limit: Optional[int] = 100) -> dict:
    """Target accuracy (gym instruct, test) and the regression suite score (first `limit` rows per task)."""
    reg = run_suite(model, tok, "regression", limit=limit)
    gen = reg["tasks"]["regression-gen"]["metrics"]["accuracy"]
    return {"task_accuracy": gym.task_accuracy(model, tok, task="instruct", split="test", n=n_task),
            "regression_score": reg["score"]["value"], "regression_score_stderr": reg["score"]["stderr"],
            "regression_gen": gen["value"]}


def _train(name: str, out: Path, base: Path, overrides: list[str], data: dict, *, guard_every: int,
           max_drop: Optional[float], guard_limit: int, base_score: float) -> tuple[dict, Path]:

    cfg = load_config("sft", overrides=[f"model={base}", f"data.train={data['train']}", f"data.eval={data['val']}",
                                        f"output_dir={out / name}", f"train.eval_every={guard_every}",
                                        *COMMON, *overrides])
    model, tok = load_for_training(cfg)
    # The guard is built here rather than from `eval.regression_every`: the stage would then add a
    # second evaluator on the full suite, and two regression scores would be logged under one name.
    evaluator, guard = regression_guard(tok, "regression", every=guard_every, max_drop=max_drop,
                                        baseline=base_score, model=model, limit=guard_limit)

    def target(m, step):
        return {"task_accuracy": gym.task_accuracy(m, tok, task="instruct", split="validation", n=32)}

    t0 = time.time()
    # the naive run only logs the regression score: no guard, so the engine keeps its last weights
    res = sft.run(cfg, evaluators=[target, evaluator], guard=guard if max_drop else None, model=model, tokenizer=tok)
    m = measure(res.model, tok)
    m.update(train_time_s=round(time.time() - t0, 1), steps=res.result["steps"],
             stop_reason=res.result["stop_reason"] or "")
    return m, res.output_dir


def run(out_dir: Union[str, Path], *, base: Optional[Union[str, Path]] = None, n_train: int = 1000,
        guard_every: int = 50, max_drop: float = 0.05, guard_limit: int = 100,
        only: tuple[str, ...] = ("naive", "guarded")) -> dict:
    """Run base / naive / guarded, print the table, write summary.json and report.html; returns the summary."""
    import torch


    torch.manual_seed(0)
    t_all = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base) if base else gym.base_model_path()
    data = {"train": gym.export("instruct", "train", out / "data" / "narrow-train.jsonl", n=n_train),
            "val": gym.export("instruct", "validation", out / "data" / "validation.jsonl", n=100),
            # general plain text for the guarded run's mix: the regression skills' *train* split
            "general": gym.export("regression", "train", out / "data" / "general-train.jsonl", n=600)}
    model, tok = load(base, device="cpu")
    summary = {"base": measure(model, tok)}

    guard_ref = run_suite(model, tok, "regression", limit=guard_limit)["score"]["value"]
    del model
    _say(f"[forgetting] base: {summary['base']}")
    runs = {}
    guarded = [*GUARDED, f"data.mix.data={data['general']}"]
    for name, overrides, drop in (("naive", NAIVE, None), ("guarded", guarded, max_drop)):
        if name not in only:
            continue
        _say(f"[forgetting] {name}: training")
        summary[name], runs[name] = _train(name, out, base, overrides, data, guard_every=guard_every, max_drop=drop,
                                           guard_limit=guard_limit, base_score=guard_ref)
        _say(f"[forgetting] {name}: {summary[name]}")
    if set(only) != {"naive", "guarded"}:
        print(format_table(summary))
        return summary
    b, n, g = summary["base"], summary["naive"], summary["guarded"]
    verdict = {"naive_regression_drop_points": round(100 * (b["regression_score"] - n["regression_score"]), 1),
               "guarded_regression_drop_points": round(100 * (b["regression_score"] - g["regression_score"]), 1),
               "guarded_minus_naive_task_points": round(100 * (g["task_accuracy"] - n["task_accuracy"]), 1)}
    verdict["targets_met"] = (verdict["naive_regression_drop_points"] >= 15
                              and verdict["guarded_regression_drop_points"] <= 2
                              and verdict["guarded_minus_naive_task_points"] >= 0)
    (out / "summary.json").write_text(json.dumps({**summary, "verdict": verdict}, indent=1))
    build_report(list(runs.values()), out / "report.html", title="posttrain: naive vs guarded fine-tuning",
                 summary=summary)
    print(format_table(summary))
    print(json.dumps(verdict))
    print(f"wall time {time.time() - t_all:.0f} s; report: {out / 'report.html'}")
    return {**summary, "verdict": verdict}


def format_table(summary: dict) -> str:
    cols = ("task_accuracy", "regression_score", "regression_gen", "steps", "train_time_s")
    lines = ["run      " + "  ".join(f"{c:>16}" for c in cols)]
    for name, m in summary.items():
        cells = [f"{m[c]:16.3f}" if isinstance(m.get(c), float) else f"{str(m.get(c, '-')):>16}" for c in cols]
        lines.append(f"{name:<9}" + "  ".join(cells))
    for name, m in summary.items():
        if m.get("stop_reason"):
            lines.append(f"{name}: {m['stop_reason']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="posttrain demo --forgetting", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="forgetting-out")
    p.add_argument("--base", help="base model directory (default: the bundled gym model)")
    a = p.parse_args(argv)
    run(a.out, base=a.base)
    return 0
