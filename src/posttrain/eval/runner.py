"""`evaluate`: run a suite on a model (and on a baseline with identical settings), write the results.

    results = posttrain.evaluate("runs/sft", suite="regression", baseline=posttrain.gym.base_model_path(),
                                 out="eval-out")
    results["comparison"]["passed"]      # False when a metric dropped by more than max_drop

Both models see the same tasks, the same rows, the same prompts (one chat template: the
evaluated model's tokenizer's), greedy decoding, the same batch size and seed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

from posttrain.eval import compare as cmp_mod
from posttrain.eval.kinds import run_task
from posttrain.eval.suites import Suite, load_suite
from posttrain.models.loading import load
from posttrain.models import adapters
from posttrain.eval.report import eval_report


def suite_score(tasks: dict) -> Optional[dict]:
    """Mean of the primary metric of every scored task; SE = sqrt(sum se_t^2) / k (tasks independent)."""
    picked = [t["metrics"][t["primary"]] for t in tasks.values() if t["in_score"]]
    if not picked:
        return None
    k = len(picked)
    return {"value": sum(m["value"] for m in picked) / k,
            "stderr": math.sqrt(sum(m["stderr"] ** 2 for m in picked)) / k, "n": k}


def run_suite(model, tokenizer, suite: Union[str, Path, Suite], *, limit: Optional[int] = None,
              batch_size: int = 32, seed: int = 0, tasks: Optional[list[str]] = None) -> dict:
    """Every task of `suite` on an in-memory model: {"suite", "tasks": {...}, "score", "settings"}."""
    s = load_suite(suite, limit=limit)
    chosen = [t for t in s.tasks if tasks is None or t.name in tasks]
    out = {}
    t0 = time.time()
    for task in chosen:
        out[task.name] = run_task(task, model, tokenizer, batch_size=batch_size, seed=seed)
    return {"suite": s.name, "tasks": out, "score": suite_score(out),
            "settings": {"decoding": "greedy", "batch_size": batch_size, "seed": seed, "limit": limit},
            "eval_time_s": round(time.time() - t0, 2)}


def _load(model, adapter, tokenizer, device, dtype):
    if isinstance(model, (str, Path)):

        m, tok = load(model, adapter=adapter, dtype=dtype, device=device)
        return m, tokenizer or tok, str(model)
    if tokenizer is None:
        raise ValueError("evaluate(model=<in-memory model>) needs tokenizer=...")
    if adapter is not None:

        model = adapters.load_adapter(model, adapter)
    return model, tokenizer, type(model).__name__


def evaluate(model, *, adapter=None, suite="regression", baseline=None, baseline_adapter=None,
             out: Optional[Union[str, Path]] = None, tokenizer=None, baseline_tokenizer=None,
             limit: Optional[int] = None, batch_size: int = 32, seed: int = 0,
             max_drop: float = cmp_mod.DEFAULT_MAX_DROP, significance: Optional[float] = None,
             device: str = "auto", dtype: str = "fp32", verbose: bool = True) -> dict:
    """Evaluate `model` (a directory or run directory, or an in-memory model with `tokenizer`) on `suite`.

    With `baseline` (or `baseline_adapter` alone, meaning the same base model with another adapter),
    the baseline runs first with identical settings and the comparison is added (`max_drop` and
    `significance` as in `compare.compare`). With `out`,
    `results.json`, per-task `samples-<label>.jsonl` and `report.html` are written there.

    Returns {"tuned": results, "base": results | None, "comparison": {...} | None, "passed": bool}.
    """
    cmp_mod.z_for(significance)  # a bad alpha fails before any model is loaded
    s = load_suite(suite, limit=limit)
    kw = dict(batch_size=batch_size, seed=seed, limit=limit)
    results: dict = {"tuned": None, "base": None, "comparison": None, "passed": True}
    if baseline is not None or baseline_adapter is not None:
        b_model = baseline if baseline is not None else model
        m, tok, name = _load(b_model, baseline_adapter, baseline_tokenizer or tokenizer, device, dtype)
        res = run_suite(m, tok, s, **kw)
        res.update(model=name, adapter=str(baseline_adapter) if baseline_adapter else None)
        results["base"] = res
        del m
        if verbose:
            print("baseline: " + cmp_mod.format_results(res), flush=True)
    m, tok, name = _load(model, adapter, tokenizer, device, dtype)
    res = run_suite(m, tok, s, **kw)
    res.update(model=name, adapter=str(adapter) if adapter else None)
    results["tuned"] = res
    if verbose:
        print(("tuned: " if results["base"] else "") + cmp_mod.format_results(res), flush=True)
    if results["base"] is not None:
        c = cmp_mod.compare(results["base"], res, max_drop=max_drop, significance=significance)
        results["comparison"] = c
        results["passed"] = c["passed"]
        if verbose:
            print(cmp_mod.format_comparison(c), flush=True)
    if out is not None:
        write_results(results, out)
    return results


def write_results(results: dict, out: Union[str, Path]) -> Path:
    """results.json (samples kept apart in samples-<label>.jsonl) and report.html (see eval/report.py)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    slim = {}
    for label in ("base", "tuned"):
        res = results.get(label)
        if res is None:
            continue
        with (d / f"samples-{label}.jsonl").open("w", encoding="utf-8") as f:
            for tname, t in res["tasks"].items():
                for smp in t["samples"]:
                    f.write(json.dumps({"task": tname, **smp}, ensure_ascii=False) + "\n")
        slim[label] = {**res, "tasks": {k: {kk: vv for kk, vv in t.items() if kk != "samples"}
                                        for k, t in res["tasks"].items()}}
    doc = {**results, **slim}
    (d / "results.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    eval_report(results, d / "report.html")
    return d / "results.json"
