"""Multi-turn tool RL on the gym, measured: base -> SFT on gym:lookup traces -> multi-turn GRPO.

    python bench/lookup_gym.py [--sft DIR | --sft-steps 40] [--grpo-steps 60] [--out DIR] [--n-eval 200] \
        [grpo.KEY=VALUE ...]

Prints one JSON object: held-out episode success (greedy, gym:lookup test split), invalid-call rate,
turns and tool calls per episode, after SFT and after GRPO, with the wall and CPU time of each stage
and the load average. The SFT and GRPO settings are the demo recipe's `lookup_sft` and `lookup` rows
(src/posttrain/gym/recipes/demo.yaml, the one source); extra arguments override the GRPO row.

Target (issue 21): SFT reaches some success X; multi-turn GRPO raises it by >= 20 points with
invalid tool calls <= 2%, within 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import posttrain
from posttrain import gym
from posttrain.eval.episodes import lookup_eval
from posttrain.pipeline.demo import stage_overrides
from posttrain.stages import grpo, load_config, sft


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(time.process_time() - c, 1),
                 "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run_sft(out: Path, steps: int | None) -> Path:
    extra = [f"train.max_steps={steps}"] if steps else []
    cfg = load_config("sft", overrides=[f"model={gym.base_model_path()}", *stage_overrides("lookup_sft", data=True),
                                        f"output_dir={out / 'sft'}", "train.progress=false", *extra])
    sft.run(cfg)
    return out / "sft" / "model"


def run_grpo(start: Path, out: Path, steps: int | None, extra: list[str]) -> Path:
    more = [f"train.max_steps={steps}"] if steps else []
    cfg = load_config("grpo", overrides=[f"model={start}", *stage_overrides("lookup", data=True),
                                         f"output_dir={out / 'grpo'}", "train.progress=false", *more, *extra])
    grpo.run(cfg)
    return out / "grpo" / "model"


def measure(path, n: int) -> dict:
    model, tok = posttrain.load(path)
    m, t = _timed(lambda: lookup_eval(model, tok, n=n))
    return {k: round(v, 4) for k, v in m.items()} | {"eval_s": t["wall_s"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/lookup-gym")
    p.add_argument("--sft", default=None, help="an existing SFT model to start from (skips SFT)")
    p.add_argument("--sft-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--grpo-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="extra grpo overrides, e.g. grpo.advantage=rloo")
    a = p.parse_args()
    out = Path(a.out)
    res: dict = {"args": vars(a)}
    if a.sft:
        sft_dir = Path(a.sft)
    else:
        sft_dir, res["sft_time"] = _timed(lambda: run_sft(out, a.sft_steps))
    res["sft"] = measure(sft_dir, a.n_eval)
    print(json.dumps(res), flush=True)
    grpo_dir, res["grpo_time"] = _timed(lambda: run_grpo(sft_dir, out, a.grpo_steps, a.overrides))
    res["grpo"] = measure(grpo_dir, a.n_eval)
    res["gain_points"] = round(100 * (res["grpo"]["episode_reward"] - res["sft"]["episode_reward"]), 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
