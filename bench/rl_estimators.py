"""The policy-gradient estimators side by side on the gym's reasoning task, at one budget.

    python bench/rl_estimators.py --model RUN/reasoning/model [--steps 30] [--prompts 16] [--G 8] \
        [--lr 5e-5] [--only grpo,rloo] [--seed 42]

Each estimator trains the `grpo` stage from the same reasoning-SFT model (the demo's
`reasoning_unguarded` row) with the settings of the demo's `grpo_unguarded` row and the same prompts
(one seed: the same prompt order), G, lengths, learning rate and number of optimizer steps; only
`grpo.advantage`, `grpo.loss`, `grpo.aggregation` and the clip ranges differ (ESTIMATORS below).
Every rollout feeds 2 optimizer steps (`grpo.minibatches=2`) so that the second one is off-policy
and the ratios, their clipping and CISPO's weights act; with one on-policy step the ratio is 1 and
GSPO and CISPO reduce to the plain policy gradient. Greedy accuracy on the same 200 held-out test
problems before and after (binomial SE), wall and CPU time of training, and accuracy gained per
minute of training. The forgetting guard is off (`eval.guard=off`): its checks would take a share of
each run's time. Prints one JSON line per estimator as it finishes, then one JSON object with all
of them (`--out FILE` also writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

# name -> grpo.* overrides (papers in docs/rl.md and the docstrings of posttrain.losses.grpo / .policy)
ESTIMATORS: dict[str, list[str]] = {
    "grpo": ["grpo.advantage=grpo", "grpo.loss=grpo", "grpo.aggregation=grpo"],
    "dr_grpo": ["grpo.advantage=dr_grpo", "grpo.loss=grpo", "grpo.aggregation=dr_grpo"],
    # DAPO's token-level loss, clip-higher and overlong filtering; its dynamic sampling (refilling
    # zero-variance groups) is not implemented: those groups are left out of the update instead
    "dapo": ["grpo.advantage=grpo", "grpo.loss=grpo", "grpo.aggregation=dapo", "grpo.eps_high=0.28",
             "grpo.mask_truncated=true"],
    "rloo": ["grpo.advantage=rloo", "grpo.loss=grpo", "grpo.aggregation=grpo"],
    "reinforce_pp": ["grpo.advantage=reinforce_pp", "grpo.loss=grpo", "grpo.aggregation=grpo"],
    "gspo": ["grpo.advantage=grpo", "grpo.loss=gspo", "grpo.eps_low=3e-4", "grpo.eps_high=4e-4"],
    "cispo": ["grpo.advantage=grpo", "grpo.loss=cispo", "grpo.aggregation=dapo", "grpo.eps_low=1.0",
              "grpo.eps_high=4.0"],
}


def accuracy(model_dir, n: int) -> float:
    from posttrain import gym
    from posttrain.models.loading import load

    model, tok = load(str(model_dir), device="cpu")
    return gym.task_accuracy(model, tok, task="reasoning", split="test", n=n)


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def train(a, name: str, out: Path, row: list[str]):
    """(RunResult, wall s, CPU s of this process) of one estimator's run; `row` the demo row's overrides."""
    from posttrain.stages import grpo, load_config

    cfg = load_config("grpo", overrides=[
        f"model={a.model}", "data.train=gym:reasoning:train", f"output_dir={out}", *row,
        f"train.max_steps={a.steps}", f"train.batch_size={a.prompts}", f"train.lr={a.lr}", "train.progress=false",
        f"train.seed={a.seed}", "eval.guard=off", f"grpo.num_generations={a.G}", "grpo.minibatches=2",
        *ESTIMATORS[name]])
    w, c = time.perf_counter(), time.process_time()
    r = grpo.run(cfg)
    return r, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the reasoning-SFT model (the demo's `reasoning_unguarded` row)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per estimator")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout")
    ap.add_argument("--G", type=int, default=8, help="completions per prompt")
    ap.add_argument("--lr", type=float, default=5e-5, help="the demo's grpo_unguarded row's")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--n", type=int, default=200, help="held-out test problems")
    ap.add_argument("--only", default=",".join(ESTIMATORS), help="comma-separated estimators")
    ap.add_argument("--before", type=float, default=None, help="the start model's accuracy, if already measured")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    names = a.only.split(",")
    unknown = [x for x in names if x not in ESTIMATORS]
    if unknown:
        ap.error(f"unknown estimator(s) {unknown}; valid: {', '.join(ESTIMATORS)}")
    import torch

    torch.set_num_threads(1)  # stable timings on a shared machine
    from posttrain.pipeline.demo import stage_overrides

    # the demo's grpo_unguarded row (the teacher's chain: full fine-tuning, fp32, rewards, lengths,
    # temperature, schedule), read once so that every estimator gets the same settings
    row = stage_overrides("grpo_unguarded")
    tmp = Path(tempfile.mkdtemp(prefix="bench-estimators-"))
    before = a.before if a.before is not None else accuracy(a.model, a.n)
    res = {"bench": "rl_estimators", "model": a.model, "steps": a.steps, "prompts": a.prompts, "G": a.G, "lr": a.lr,
           "seed": a.seed, "n": a.n, "row": row, "before": before, "before_se": round(se(before, a.n), 3), "runs": {}}
    for name in names:
        load0 = os.getloadavg()[0]
        r, wall, cpu = train(a, name, tmp / name, row)
        after = accuracy(r.model_dir, a.n)
        steps = [json.loads(x) for x in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s.get("split") == "train"]
        res["runs"][name] = {
            "after": after, "after_se": round(se(after, a.n), 3), "gain": round(after - before, 3),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "gain_per_cpu_min": round((after - before) / (cpu / 60), 4),
            "gain_per_wall_min": round((after - before) / (wall / 60), 4),
            "train_reward_first5": round(sum(s["reward"] for s in steps[:5]) / 5, 3),
            "train_reward_last5": round(sum(s["reward"] for s in steps[-5:]) / 5, 3),
            "clip_frac_mean": round(sum(s.get("clip_frac", 0.0) for s in steps) / len(steps), 4),
            "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        print(json.dumps({name: res["runs"][name]}), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
