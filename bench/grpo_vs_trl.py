"""GRPO side by side: posttrain `grpo` against TRL `GRPOTrainer` + PEFT, whole process each, alternated.

    python bench/grpo_vs_trl.py [--rounds 3] [--steps 40] [--sides posttrain,trl]

The issue-20 setting: a tiny random Qwen2 (hidden 128, 4 layers, 4 heads / 2 KV heads, 512-token
BPE vocabulary), 4 prompts x 4 completions per step, 32 new tokens at temperature 1, LoRA r16 / alpha 32
on every linear layer, lr 1e-5, 40 optimizer steps (one per rollout), beta = 0, a length reward
(completion characters / 100), fp32, 1 OpenMP thread per process. Each side runs in its own
subprocess (`python bench/grpo_vs_trl.py --child SIDE ...`), which trains, saves the adapter and
exits; the parent times the whole process (interpreter start to exit) and reads the child's JSON:
its peak RSS and the per-phase seconds.

Phases: `generation` (sampling), `scoring` (rewards; posttrain: plus the old/reference log-prob
pass when one runs), `update` (loss, backward, optimizer step), `setup` (imports, model load, until
the first step), `teardown` (after the last step: saving, report, manifest). posttrain's come from
the timings its stage logs (metrics.jsonl); TRL's from timers wrapped around `GRPOTrainer._generate`,
`_calculate_rewards`, `_generate_and_score_completions` and `training_step` in the child.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()


def length_reward(prompts, completions, **kw):
    """The reward both sides optimise: longer completions score higher."""
    return [len(c) / 100 for c in completions]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_fixture(tmp: Path) -> tuple[str, str]:
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    model = build_tiny_model("qwen2", tmp / "model", tokenizer=build_tokenizer(), hidden=128, layers=4,
                             intermediate=256)
    data = tmp / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}: count to"}) for i in range(256)) + "\n")
    return str(model), str(data)


def child_posttrain(a, extra=()) -> dict:
    from posttrain.stages import grpo, load_config

    cfg = load_config("grpo", overrides=[
        f"model={a.model}", f"data.train={a.data}", f"output_dir={a.out}", "train.batch_size=4",
        f"train.max_steps={a.steps}", "train.lr=1e-5", "train.progress=false", "adapter.type=lora", "adapter.r=16",
        "adapter.alpha=32", "grpo.num_generations=4", "grpo.max_new_tokens=32", "grpo.temperature=1.0", *extra])
    t_run, wall_run = time.perf_counter(), time.time()
    grpo.run(cfg, reward_fns=[length_reward])
    t_end, wall_end = time.perf_counter(), time.time()
    rows = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("split") == "train"]
    # the run's own start (model load, data) and finish (adapter, report, manifest), from the logged step times
    start_s = steps[0]["time"] - steps[0]["step_time_s"] - wall_run
    finish_s = wall_end - steps[-1]["time"]
    rows = [r for r in rows if r.get("split") == "train" and "rollout_time_s" in r]
    # update_time_s is the previous rollout's optimizer step, logged with the next rollout
    gen = sum(r["rollout_time_s"] for r in rows)
    score = sum(r.get("scoring_time_s", 0) + r.get("ref_time_s", 0) for r in rows)
    upd = [r["update_time_s"] for r in rows if "update_time_s" in r]
    return {"steps": len(rows), "generation_s": gen, "scoring_s": score, "update_s": sum(upd) * len(rows) / max(1, len(upd)),
            "step_median_s": statistics.median(r["rollout_time_s"] + r.get("scoring_time_s", 0) + r.get("ref_time_s", 0)
                                               + u for r, u in zip(rows[1:], upd)) if upd else None,
            "generation_median_s": statistics.median(r["rollout_time_s"] for r in rows[1:]),
            "update_median_s": statistics.median(upd) if upd else None,
            "reward_last": rows[-1].get("reward"), "run_s": t_end - t_run, "setup_to_run_s": t_run - T_START,
            "run_start_s": start_s, "run_finish_s": finish_s}


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    timers = {"generation": [], "scoring": [], "generate_and_score": [], "update": []}

    def timed(cls, name, key):
        fn = getattr(cls, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timers[key].append(time.perf_counter() - t)

        setattr(cls, name, wrapper)

    timed(GRPOTrainer, "_generate", "generation")
    timed(GRPOTrainer, "_calculate_rewards", "scoring")
    timed(GRPOTrainer, "_generate_and_score_completions", "generate_and_score")
    timed(GRPOTrainer, "training_step", "update")
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    prompts = [json.loads(x)["prompt"] for x in Path(a.data).read_text().splitlines()]
    cfg = GRPOConfig(output_dir=a.out, per_device_train_batch_size=16, num_generations=4, max_completion_length=32,
                     learning_rate=1e-5, max_steps=a.steps, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                     use_cpu=True, bf16=False, fp16=False, save_strategy="no", report_to=[], logging_steps=1,
                     disable_tqdm=True, seed=42, dataloader_num_workers=0)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    tr = GRPOTrainer(model=model, reward_funcs=length_reward, args=cfg, processing_class=tok,
                     train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), peft_config=peft)
    t_run = time.perf_counter()
    tr.train()
    tr.save_model(a.out + "/adapter")
    t_end = time.perf_counter()
    gs, gen, sc, upd = (timers[k] for k in ("generate_and_score", "generation", "scoring", "update"))
    # training_step includes _prepare_inputs -> _generate_and_score_completions; the update is the rest
    upd_only = [u - g for u, g in zip(upd, gs)] if len(upd) == len(gs) else upd
    rewards = [h["reward"] for h in tr.state.log_history if "reward" in h]
    return {"steps": len(upd), "generation_s": sum(gen), "scoring_s": sum(gs) - sum(gen),
            "rewards_s": sum(sc), "update_s": sum(upd_only),
            "step_median_s": statistics.median(upd[1:]), "generation_median_s": statistics.median(gen[1:]),
            "update_median_s": statistics.median(upd_only[1:]), "reward_last": rewards[-1] if rewards else None,
            "run_s": t_end - t_run, "setup_to_run_s": t_run - T_START}


SIDES = {"posttrain": child_posttrain, "trl": child_trl,
         # the adapter folded into plain linear layers while sampling (grpo.merge_adapter, opt-in)
         "posttrain_merged": lambda a: child_posttrain(a, ["grpo.merge_adapter=true"])}


def run_side(side: str, a, model: str, data: str, tmp: Path, k: int) -> dict:
    out = tmp / f"{side}-{k}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", side, "--model", model, "--data", data, "--out", str(out),
           "--steps", str(a.steps)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{side} child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    res["teardown_s"] = wall - res.pop("setup_to_run_s") - res["run_s"]
    res["setup_s"] = wall - res["run_s"] - res["teardown_s"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sides", default="posttrain,trl", help="comma-separated: posttrain, trl, posttrain_merged")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        res = SIDES[a.child](a)
        res["peak_rss_mib"] = _peak_rss_mib()
        print(json.dumps(res))
        return res
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model, data = make_fixture(tmp)
    sides = a.sides.split(",")
    runs = {s: [] for s in sides}
    loads = [os.getloadavg()[0]]
    for k in range(a.rounds):
        for s in (sides if k % 2 == 0 else sides[::-1]):  # alternate the order between rounds
            runs[s].append(run_side(s, a, model, data, tmp, k))
            loads.append(os.getloadavg()[0])
    keys = ["process_s", "setup_s", "run_s", "run_start_s", "run_finish_s", "teardown_s", "generation_s", "scoring_s", "update_s", "step_median_s",
            "generation_median_s", "update_median_s", "peak_rss_mib", "reward_last"]
    result = {"bench": "grpo_vs_trl", "rounds": a.rounds, "steps": a.steps, "load_avg_1min": [round(x, 2) for x in loads]}
    for s in sides:
        result[s] = {key: round(statistics.median(r[key] for r in runs[s]), 3) for key in keys
                     if all(isinstance(r.get(key), (int, float)) for r in runs[s])}
        result[s]["process_s_all"] = [round(r["process_s"], 2) for r in runs[s]]
    for s in sides:
        if s.startswith("posttrain") and "trl" in runs:
            pt, trl = result[s], result["trl"]
            result[s]["vs_trl"] = {"process": round(trl["process_s"] / pt["process_s"], 2),
                                   "run": round(trl["run_s"] / pt["run_s"], 2),
                                   "step": round(trl["step_median_s"] / pt["step_median_s"], 2),
                                   "generation": round(trl["generation_s"] / pt["generation_s"], 2),
                                   "update": round(trl["update_s"] / pt["update_s"], 2),
                                   "peak_rss": round(pt["peak_rss_mib"] / trl["peak_rss_mib"], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
