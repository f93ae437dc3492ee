"""Multi-turn tool RL on the gym, measured: base -> SFT on gym:lookup traces -> multi-turn GRPO.

    python bench/lookup_gym.py [--sft DIR | --sft-steps 40 --sft-seed 7] [--grpo-steps 60] [--out DIR] \
        [--n-eval 200] [grpo.KEY=VALUE ...]

Prints one JSON object: held-out episode success (greedy, gym:lookup test split), invalid-call rate,
turns and tool calls per episode, after SFT and after GRPO, with the wall and CPU time of each stage
and the load average; `failures` classifies each held-out episode against the worked trace's
calculation (success, wrong items, wrong operator, wrong first / second operand...), and
`--sampled G` adds the same for G episodes per question at temperature 1.0 (the groups GRPO sees).
The SFT and GRPO settings are the demo recipe's `lookup_sft` and `lookup` rows
(src/posttrain/gym/recipes/demo.yaml, the one source); extra arguments override the GRPO row.

Target (issue 21): SFT reaches some success X; multi-turn GRPO raises it by >= 20 points with
invalid tool calls <= 2%, within 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import posttrain
from posttrain import gym
from posttrain.eval.episodes import lookup_eval
from posttrain.gym.lookup import MAX_TURNS, LookupEnv, expression_parts
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.rollout.episodes import run_episodes
from posttrain.pipeline.demo import stage_overrides
from posttrain.stages import grpo, load_config, sft


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(time.process_time() - c, 1),
                 "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run_sft(out: Path, steps: int | None, seed: int | None) -> Path:
    extra = ([f"train.max_steps={steps}"] if steps else []) + ([f"train.seed={seed}"] if seed is not None else [])
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


def _calls(messages: list[dict], name: str) -> list[dict]:
    return [c["function"]["arguments"] for m in messages if m["role"] == "assistant"
            for c in m.get("tool_calls") or [] if c["function"]["name"] == name]


def failure(row: dict, messages: list[dict], reward: float) -> str:
    """What went wrong in one episode, against the row's worked trace."""
    if reward >= 1:
        return "success"
    if [a.get("item") for a in _calls(messages, "lookup")] != [a["item"] for a in _calls(row["messages"], "lookup")]:
        return "wrong items"
    got = [a.get("expression") for a in _calls(messages, "calculator")]
    if not got:
        return "no calculation"
    parts = expression_parts(got[0])
    if parts is None:
        return "other expression"
    gold = expression_parts(_calls(row["messages"], "calculator")[0]["expression"])
    wrong = [name for name, a, b in zip(("first operand", "operator", "second operand"), parts, gold) if a != b]
    return "wrong " + " and ".join(wrong) if wrong else "right calculation, wrong answer"


def failures(model, tok, n: int, group: int) -> dict:
    """Fractions of episodes per `failure` class: greedy (group 0) or `group` samples per question at T 1.0."""
    rows = gym.load_task_rows("lookup", "test", n=n, seed=0)
    params = SamplingParams(max_new_tokens=48, temperature=1.0 if group else 0.0, seed=1 if group else None)
    eps = run_episodes(RolloutEngine(model, tok, batch_size=64), rows, LookupEnv, params, group_size=max(1, group),
                       max_turns=MAX_TURNS, max_length=1024)
    g = max(1, group)
    kinds = Counter(failure(rows[i // g], m, float(r)) for i, (m, r) in enumerate(zip(eps.messages, eps.rewards)))
    out = {k: round(v / len(eps), 3) for k, v in kinds.most_common()}
    if group:
        out["groups_with_a_success"] = round(sum(any(float(r) >= 1 for r in eps.rewards[i:i + g])
                                                 for i in range(0, len(eps), g)) / len(rows), 3)
    return out


def measure(path, n: int, sampled: int) -> dict:
    model, tok = posttrain.load(path)
    m, t = _timed(lambda: lookup_eval(model, tok, n=n))
    res = {k: round(v, 4) for k, v in m.items()} | {"eval_s": t["wall_s"], "failures": failures(model, tok, n, 0)}
    if sampled:
        res["failures_sampled"] = failures(model, tok, min(n, 50), sampled)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/lookup-gym")
    p.add_argument("--sft", default=None, help="an existing SFT model to start from (skips SFT)")
    p.add_argument("--sft-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--sft-seed", type=int, default=None, help="SFT's train.seed (data order); default: the recipe's")
    p.add_argument("--grpo-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--sampled", type=int, default=0, help="also classify G episodes per question (50) at T 1.0")
    p.add_argument("overrides", nargs="*", help="extra grpo overrides, e.g. grpo.advantage=rloo")
    a = p.parse_args()
    out = Path(a.out)
    res: dict = {"args": vars(a)}
    if a.sft:
        sft_dir = Path(a.sft)
    else:
        sft_dir, res["sft_time"] = _timed(lambda: run_sft(out, a.sft_steps, a.sft_seed))
    res["sft"] = measure(sft_dir, a.n_eval, a.sampled)
    print(json.dumps(res), flush=True)
    grpo_dir, res["grpo_time"] = _timed(lambda: run_grpo(sft_dir, out, a.grpo_steps, a.overrides))
    res["grpo"] = measure(grpo_dir, a.n_eval, a.sampled)
    res["gain_points"] = round(100 * (res["grpo"]["episode_reward"] - res["sft"]["episode_reward"]), 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
