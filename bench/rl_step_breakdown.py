"""Where an RL step's time goes: generation, scoring (rewards / reward model, reference, values), update.

    python bench/rl_step_breakdown.py [--stage grpo|ppo|both] [--steps 4] [--model DIR]

Runs a short GRPO and/or PPO training run through the real stage and engine and reads the
per-rollout timings that the stages log (`rollout_time_s`, `scoring_time_s`, `ref_time_s` /
`ref_value_time_s`, `update_time_s`: the wall time of the previous rollout's optimizer steps).
The model is the gym's bundled base (reasoning prompts, the `math` reward) when present, else a
tiny random Qwen2 with a digit-count reward. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def digit_frac(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def _setup(model_dir, tmp: Path):
    if model_dir is None:
        try:
            from posttrain import gym

            model_dir = gym.base_model_path()
            data = gym.export("reasoning", "train", tmp / "prompts.jsonl", n=256)
            return str(model_dir), str(data), ["math"], []
        except (FileNotFoundError, ImportError):
            from posttrain.models.tiny import build_tiny_model, build_tokenizer

            model_dir = build_tiny_model("qwen2", tmp / "tiny", tokenizer=build_tokenizer(), hidden=128, layers=4)
    data = tmp / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}: count to"}) for i in range(256)))
    return str(model_dir), str(data), [], [digit_frac]


def _summary(run_dir: Path, keys) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    per_rollout = {r["rollout_time_s"]: r for r in rows}.values()  # one record per rollout
    out = {}
    for k in keys:
        vals = [r[k] for r in per_rollout if isinstance(r.get(k), (int, float))]
        out[k] = round(statistics.median(vals), 3) if vals else None
    out["optimizer_steps"] = len(rows)
    out["rollouts"] = len(per_rollout)
    out["tokens_per_s_rollout"] = out.pop("rollout_tokens_per_s", None)
    return out


def main(argv=None) -> dict:
    from posttrain.stages import load_config
    from posttrain.stages import grpo, ppo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["grpo", "ppo", "both"], default="both")
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings on a shared "
                    "machine; 0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    model_dir, data, rewards, fns = _setup(a.model, tmp)
    common = [f"model={model_dir}", f"data.train={data}", f"train.batch_size={a.batch}", "train.progress=false",
              "train.lr=1e-5"]
    result = {"bench": "rl_step_breakdown", "model": model_dir, "prompts_per_rollout": a.batch, "threads": a.threads,
              "max_new_tokens": a.max_new}
    if a.stage in ("grpo", "both"):
        cfg = load_config("grpo", overrides=common + [
            f"output_dir={tmp / 'grpo'}", f"train.max_steps={2 * a.rollouts}", "grpo.iterations=2",
            f"grpo.max_new_tokens={a.max_new}", "grpo.num_generations=4", f"grpo.rewards={json.dumps(rewards)}"])
        grpo.run(cfg, reward_fns=fns)
        result["grpo"] = _summary(tmp / "grpo", ["rollout_time_s", "scoring_time_s", "ref_time_s", "update_time_s",
                                                 "rollout_tokens_per_s"])
        result["grpo"]["settings"] = "G=4, 2 iterations x 1 minibatch per rollout"
    if a.stage in ("ppo", "both"):
        cfg = load_config("ppo", overrides=common + [
            f"output_dir={tmp / 'ppo'}", f"train.max_steps={2 * a.rollouts}", "ppo.epochs=2",
            f"ppo.max_new_tokens={a.max_new}", f"ppo.rewards={json.dumps(rewards)}"])
        ppo.run(cfg, reward_fns=fns)
        result["ppo"] = _summary(tmp / "ppo", ["rollout_time_s", "scoring_time_s", "ref_value_time_s",
                                               "update_time_s", "rollout_tokens_per_s"])
        result["ppo"]["settings"] = "2 epochs x 1 minibatch per rollout; reference + value passes in ref_value_time_s"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
