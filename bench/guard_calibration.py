"""Calibrate the default forgetting guard on the gym: does drift from the base rank runs like forgetting does?

    python bench/guard_calibration.py --out calib-out [--only A,B]

Runs SFT of the bundled base model (`posttrain.gym.base_model_path()`) on the gym's narrow chat
instructions (`posttrain gym export --task instruct`) with settings that forget to different degrees
(learning rate, epochs, LoRA vs full), each through the CLI (`posttrain sft ...`). For every run it
measures, against the base:

- the gym regression-score drop: `posttrain eval --suite regression` (base score − tuned score);
- drift: KL(base ‖ tuned) per token on the base's continuations of the 300 bundled general prompts
  (`posttrain.eval.drift`), both the full set and the 64-prompt subset the in-training guard uses;
- general-text perplexity change: on the bundled paragraphs, and on the gym's plain general text
  (the `regression` task, train split: what a gym user would pass as `data.mix.data`).

Prints one JSON object: a row per run and the Spearman rank correlation of each signal with the
regression drop. Keeps every run short (the machine is shared): `nice` it.
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

# name -> overrides; ordered roughly from gentle to destructive
RUNS = {
    "A lora 5e-5 1ep": ["adapter.type=lora", "train.lr=5e-5", "train.epochs=1"],
    "B lora 2e-4 1ep": ["adapter.type=lora", "train.lr=2e-4", "train.epochs=1"],
    "C lora 1e-3 2ep": ["adapter.type=lora", "train.lr=1e-3", "train.epochs=2"],
    "D full 1e-5 1ep": ["adapter.type=none", "train.lr=1e-5", "train.epochs=1"],
    "E full 5e-5 1ep": ["adapter.type=none", "train.lr=5e-5", "train.epochs=1"],
    "F full 2e-4 2ep": ["adapter.type=none", "train.lr=2e-4", "train.epochs=2"],
    "G full 1e-3 3ep": ["adapter.type=none", "train.lr=1e-3", "train.epochs=3", "train.schedule=constant"],
    "H lora 3e-3 3ep": ["adapter.type=lora", "train.lr=3e-3", "train.epochs=3", "train.schedule=constant"],
    # the guarded recipe of `posttrain demo --forgetting` (it keeps the regression score): a good run
    # that trains longer, which the default limit must let through
    "I lora 2e-4 3ep+mix": ["adapter.type=lora", "train.lr=2e-4", "train.epochs=3", "data.mix.data={general}",
                            "data.mix.ratio=0.2"],
}
COMMON = ["train.batch_size=16", "data.max_length=256", "train.progress=false", "train.warmup_steps=5",
          "data.limit=1000"]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    a, b = ranks(x), ranks(y)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    return cov / math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "posttrain", *args], check=True,
                   stdout=subprocess.DEVNULL if "sft" in args[:1] else None)


def _regression(model_dir: Path, out: Path) -> float:
    if not (out / "results.json").exists():
        _cli("eval", "--model", str(model_dir), "--suite", "regression", "--out", str(out))
    return json.loads((out / "results.json").read_text())["tuned"]["score"]["value"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="calib-out")
    ap.add_argument("--only", help="comma-separated run letters (A,B,...)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("POSTTRAIN_CACHE", str(out / "cache"))

    import posttrain
    from posttrain import gym
    from posttrain.eval import drift as D
    from posttrain.eval import perplexity as P

    from posttrain.config import EvalConfig

    # the runs must forget freely: the default-on guard would roll them back
    common = COMMON + (["eval.guard=off"] if "guard" in EvalConfig.model_fields else [])
    base = gym.base_model_path()
    data = out / "data"
    if not (data / "val.jsonl").exists():
        data.mkdir(exist_ok=True)
        _cli("gym", "export", "--task", "instruct", "--split", "train", "--out", str(data / "train.jsonl"))
        _cli("gym", "export", "--task", "instruct", "--split", "validation", "--out", str(data / "val.jsonl"))
        _cli("gym", "export", "--task", "regression", "--split", "train", "--out", str(data / "general.jsonl"))

    base_model, tok = posttrain.load(str(base))
    t0 = time.perf_counter()
    ref = D.build_drift_reference(base_model, tok)
    ref64 = D.build_drift_reference(base_model, tok, n_prompts=64)
    t_ref = time.perf_counter() - t0
    texts = {"bundled": P.text_reference(base_model, tok), "gym": P.text_reference(base_model, tok, str(data / "general.jsonl"))}
    base_score = _regression(base, out / "base-eval")

    rows = []
    for name, overrides in RUNS.items():
        if a.only and name[0] not in a.only.split(","):
            continue
        run = out / name.split()[0]
        t1 = time.perf_counter()
        if not (run / "manifest.json").exists():
            _cli("sft", f"model={base}", f"data.train={data / 'train.jsonl'}", f"output_dir={run}", *common,
                 *(o.format(general=data / "general.jsonl") for o in overrides))
        t_train = time.perf_counter() - t1
        score = _regression(run, run / "eval-regression")
        model, _ = posttrain.load(str(run))
        t2 = time.perf_counter()
        d = D.drift(model, ref)
        t_check = time.perf_counter() - t2
        d64 = D.drift(model, ref64)
        row = {"run": name, "regression_score": score, "regression_drop": base_score - score,
               "drift_kl": d["drift_kl"], "drift_kl_stderr": d["drift_kl_stderr"], "drift_kl_64": d64["drift_kl"],
               **{f"ppl_change_{k}": P.perplexity_change(model, t)["general_ppl_change"] for k, t in texts.items()},
               "train_s": round(t_train, 1), "drift_check_s": round(t_check, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    drops = [r["regression_drop"] for r in rows]
    result = {"base_regression_score": base_score, "reference_build_s": round(t_ref, 1), "runs": rows,
              "spearman": {k: spearman([r[k] for r in rows], drops) for k in
                           ("drift_kl", "drift_kl_64", "ppl_change_bundled", "ppl_change_gym")} if len(rows) > 2 else None,
              "load_average": os.getloadavg()}
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
