"""What the default drift guard costs a run, cold cache and warm, from its own time accounting.

    python bench/guard_cost.py --which tiny --runs 3 --out guard-cost
    python bench/guard_cost.py --which demo --runs 3 --out guard-cost

`tiny`: a tiny random Qwen2 (`posttrain.models.tiny`), full SFT, 300 steps of 8 short chats (about
12 s of training on one thread). `demo`: the demo's SFT row (the bundled base model, LoRA r=16, gym
`instruct` with 20% of gym `regression` text mixed in, 150 steps, bf16, `eval.guard_max_drift_kl=1.0`)
through `posttrain.stages.sft`, the keys of `posttrain demo --print-recipe`. Each round runs a cold
cache (a fresh `$POSTTRAIN_CACHE`) and then a warm one (the same cache, with every piece of the
guard's reference built into it first), so the two sides alternate under the same load. Prints one JSON line per run: the manifest's `result.guard`, the
run's training and wall seconds and the load average, and a summary with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _tiny_overrides(out: Path) -> list:
    from posttrain.models.tiny import build_tiny_model

    model = out / "tiny-qwen2"
    if not model.exists():
        build_tiny_model("qwen2", model)
    train = out / "narrow.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say it {i}"},
                                                      {"role": "assistant", "content": "yes yes yes yes"}]}) + "\n"
                             for i in range(32)))
    return [f"model={model}", f"data.train={train}", "adapter.type=none", "train.batch_size=8", "train.max_steps=300",
            "train.lr=1e-4", "train.schedule=constant", "train.warmup_steps=0"]


def _demo_overrides(out: Path) -> list:
    from posttrain import gym

    return [f"model={gym.base_model_path()}", "data.train=gym:instruct:train", "data.eval=gym:instruct:validation",
            "data.max_length=256", "data.mix.data=gym:regression:train", "data.mix.ratio=0.2", "adapter.type=lora",
            "adapter.r=16", "adapter.alpha=32", "train.lr=1e-3", "train.batch_size=16", "train.epochs=1",
            "train.max_steps=150", "train.schedule=cosine", "train.warmup_steps=10", "train.precision=bf16",
            "train.eval_every=50", "eval.guard_max_drift_kl=1.0"]


def _fill_cache(cfg) -> None:
    """Every piece of the reference the run's guard will use, built into the cache now."""
    import torch

    from posttrain.engine.setup import load_for_training
    from posttrain.eval.guard import default_guard

    model, tok = load_for_training(cfg, torch.device("cpu"))
    g = default_guard(cfg, tok, model).drift
    g._grow(len(g.pieces))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="guard-cost")
    a = ap.parse_args()
    out = Path(a.out).resolve() / a.which
    out.mkdir(parents=True, exist_ok=True)

    from posttrain.stages import load_config, sft

    base = _tiny_overrides(out) if a.which == "tiny" else _demo_overrides(out)
    rows = []
    for r in range(a.runs):
        cache = out / f"cache-{r}-{time.time_ns()}"  # a base never seen: the cold side builds its reference
        for side in ("cold", "warm"):
            os.environ["POSTTRAIN_CACHE"] = str(cache)
            run_dir = out / f"run-{r}-{side}-{time.time_ns()}"
            cfg = load_config("sft", overrides=[*base, f"output_dir={run_dir}", "train.progress=false"])
            if side == "warm":
                _fill_cache(cfg)
            t0 = time.perf_counter()
            res = sft.run(cfg)
            wall = time.perf_counter() - t0
            g = res.result["guard"]
            row = {"which": a.which, "round": r, "cache": side, "guard": g, "train_time_s": res.result["train_time_s"],
                   "wall_s": round(wall, 2), "load_average": [round(x, 2) for x in os.getloadavg()]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for side in ("cold", "warm"):
        rs = [x for x in rows if x["cache"] == side]
        summary[side] = {k: statistics.median(x["guard"][k] for x in rs)
                         for k in ("time_share", "setup_s", "build_s", "spent_s", "checks", "last_check_step")}
        summary[side]["first_check_step"] = [x["guard"].get("first_check_step") for x in rs]
        summary[side]["time_share_all"] = [x["guard"]["time_share"] for x in rs]
        summary[side]["wall_s"] = [x["wall_s"] for x in rs]
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
