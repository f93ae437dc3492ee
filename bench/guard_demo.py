"""The default drift guard on the gym's most forgetting calibration run: it stops it and rolls back.

    python bench/guard_demo.py --out guard-out [--calib calib-out]

Runs calibration run G (full fine-tuning of the bundled base model, lr 1e-3 constant, 3 epochs on
1000 gym `instruct` rows; unguarded it loses about 41 regression points) with `DriftGuard` at its
default limits and budget, through the Engine's evaluator and guard hooks (the evaluator asks the
guard whether a check is due after every step). Then scores the published model with
`posttrain eval --suite regression` and prints one JSON object: the stop reason, the checks, the
guard's share of the wall time, and the regression score.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="guard-out")
    ap.add_argument("--calib", default="calib-out", help="bench/guard_calibration.py's --out (for its data)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("POSTTRAIN_CACHE", str(Path(a.calib) / "cache"))

    from posttrain import gym
    from posttrain.eval.guard import DriftGuard
    from posttrain.models.loading import load
    from posttrain.stages import load_config, sft

    base = gym.base_model_path()
    cfg = load_config("sft", overrides=[
        f"model={base}", f"data.train={Path(a.calib) / 'data' / 'train.jsonl'}", f"output_dir={out / 'G-guarded'}",
        "adapter.type=none", "train.lr=1e-3", "train.epochs=3", "train.schedule=constant", "train.batch_size=16",
        "data.max_length=256", "train.warmup_steps=5", "data.limit=1000", "train.progress=false",
        "train.eval_every=1", "eval.guard=off"])  # this script runs its own guard beside the stage
    model, tok = load(str(base), dtype="fp32", device="cpu")
    model.requires_grad_(True)
    t0 = time.perf_counter()
    guard = DriftGuard(model, tok)
    setup_s = time.perf_counter() - t0
    total = math.ceil(1000 / 16) * 3  # the engine's step count: 1000 rows, batch 16, 3 epochs

    def evaluator(m, step):
        return guard(m, step) if guard.due(step, total) else {}

    t1 = time.perf_counter()
    res = sft.run(cfg, evaluators=[evaluator], guard=guard.check, model=model, tokenizer=tok)
    wall = time.perf_counter() - t1
    run = res.output_dir
    subprocess.run([sys.executable, "-m", "posttrain", "eval", "--model", str(run), "--suite", "regression",
                    "--out", str(run / "eval-regression")], check=True, stdout=subprocess.DEVNULL)
    score = json.loads((run / "eval-regression" / "results.json").read_text())["tuned"]["score"]["value"]
    result = {"stop_reason": res.result["stop_reason"], "steps": res.result["steps"], "checks": guard.history,
              "guard": guard.summary(), "guard_setup_s": round(setup_s, 2), "wall_s": round(wall, 1),
              "regression_score": score, "load_average": os.getloadavg()}
    (out / "guard_demo.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
