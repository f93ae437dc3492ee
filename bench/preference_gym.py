"""The effect of preference optimization on the gym, measured: base -> SFT -> DPO, and base -> SFT -> KTO
on the unpaired version of the same preference data. Prints one JSON object.

    python bench/preference_gym.py [--base DIR] [--out DIR] [--sft-steps 150] [--dpo-steps 120]

Targets (issue 5): held-out preference accuracy >= 0.9; correctness of greedy answers on held-out
preference prompts above SFT alone; regression score drop <= 0.02.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def run_sft(base: Path, out: Path, steps: int, n_train: int, extra: tuple[str, ...] | list[str] = ()) -> Path:
    from posttrain import gym
    from posttrain.stages import load_config
    from posttrain.pipeline.demo import SFT_OVERRIDES
    from posttrain.stages import sft

    train_f = gym.export("instruct", "train", out / "data" / "instruct-train.jsonl", n=n_train)
    ov = [o for o in SFT_OVERRIDES if not o.startswith(("train.max_steps", "train.eval_every"))]
    cfg = load_config("sft", overrides=[f"model={base}", f"data.train={train_f}", f"output_dir={out / 'sft'}",
                                        *ov, f"train.max_steps={steps}", "train.progress=false", *extra])
    sft.run(cfg)
    return out / "sft"


def unpaired_file(rows: list[dict], path: Path) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n")
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["rejected"], "label": False}) + "\n")
    return path


def run_kto(start: Path, out: Path, steps: int, n_train: int, n_eval: int) -> dict:
    from posttrain import gym
    from posttrain.stages import load_config
    from posttrain.stages import kto
    from posttrain.eval.preference import held_out_pref_accuracy

    train_f = unpaired_file(gym.load_task_rows("preference", "train", n=n_train), out / "data" / "kto-train.jsonl")
    cfg = load_config("kto", overrides=[
        f"model={start}", f"data.train={train_f}", f"output_dir={out / 'kto'}", "train.progress=false",
        "adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "kto.beta=0.1", "train.lr=1e-3",
        "train.batch_size=16", f"train.max_steps={steps}", "train.warmup_steps=10", "train.precision=auto",
        "data.max_length=256"])
    t0 = time.time()
    res = kto.run(cfg)
    model, tok = res.model.eval(), res.tokenizer
    rows = gym.load_task_rows("preference", "test", n=n_eval)
    return {"preference_accuracy": round(held_out_pref_accuracy(model, tok, rows, beta=0.1), 4),
            "preference_correctness": round(gym.task_accuracy(model, tok, task="preference", split="test", n=n_eval), 4),
            "regression_score": round(gym.regression_score(model, tok, n=n_eval), 4),
            "train_time_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="base model (default: the bundled gym model)")
    p.add_argument("--out", default=None)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--no-kto", action="store_true")
    p.add_argument("--dpo", nargs="*", default=[], help="extra dpo overrides, e.g. train.lr=2e-3")
    a = p.parse_args(argv)
    from posttrain import gym
    from posttrain.pipeline.gym_rows import dpo_row, starting_model

    base = Path(a.base) if a.base else gym.base_model_path()
    out = Path(a.out or tempfile.mkdtemp(prefix="pref-gym-"))
    t0 = time.time()
    sft_dir = run_sft(base, out, a.sft_steps, 2400)
    summary = {"dpo": dpo_row(sft_dir, out / "dpo-stage", n_train=a.n_train, n_eval=a.n_eval,
                                     extra_overrides=[f"train.max_steps={a.dpo_steps}", *a.dpo])}
    d = summary["dpo"]
    summary["checks"] = {
        "preference_accuracy>=0.9": d["preference_accuracy"] >= 0.9,
        "correctness_above_sft": d["preference_correctness"] > d["sft_preference_correctness"],
        "regression_drop<=0.02": d["sft_regression_score"] - d["regression_score"] <= 0.02,
    }
    if not a.no_kto:
        summary["kto"] = run_kto(starting_model(sft_dir, out / "dpo-stage"), out, a.dpo_steps, a.n_train,
                                 a.n_eval)
    summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
