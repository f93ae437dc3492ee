"""Gym acceptance runs of single demo rows, with their before/after numbers: DPO from an SFT model,
and a reward model then PPO. Each trains with the settings of its row in the demo recipe
(`posttrain.pipeline.demo.stage_overrides`), so a test or a benchmark runs what the demo runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from posttrain import gym
from posttrain.eval.preference import held_out_pref_accuracy
from posttrain.models import adapters
from posttrain.models.loading import load
from posttrain.models.reward import reward_model_from_lm, reward_scores
from posttrain.pipeline.demo import stage_overrides
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logprobs
from posttrain.rollout.prompts import prompt_text
from posttrain.stages import dpo, load_config, ppo, reward


def starting_model(path, out_dir) -> Path:
    """A plain HF model directory from a model dir, a finished run, or an adapter run (merged into its base)."""
    p = Path(path)
    manifest = p / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("model_dir") == "adapter"):
        return p
    base = yaml.safe_load((p / "config.yaml").read_text())["model"]
    return adapters.merge_to_dir(base, p / "adapter", Path(out_dir) / "start")


def dpo_row(sft_run_dir_or_model, out_dir, *, n_train: int = 1600, n_eval: int = 200,
            extra_overrides: Sequence[str] = ()) -> dict:
    """base -> SFT -> DPO on the gym's `preference` task; returns the before/after numbers.

    Trains the demo's `dpo` row (a LoRA adapter, the adapter-disabled SFT model as the reference),
    then measures on held-out (test) preference rows: `preference_accuracy` (implicit-reward
    pairwise accuracy), `preference_correctness` (greedy answers verified) and `regression_score`,
    each also for the SFT model (`sft_*`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = starting_model(sft_run_dir_or_model, out)
    train_f = gym.export("preference", "train", out / "data" / "preference-train.jsonl", n=n_train)
    val_f = gym.export("preference", "validation", out / "data" / "preference-validation.jsonl", n=64)
    test_rows = gym.load_task_rows("preference", "test", n=n_eval)
    sft_model, tok = load(start, device="cpu")
    sft = {"preference_correctness": gym.task_accuracy(sft_model, tok, task="preference", split="test", n=n_eval),
           "regression_score": gym.regression_score(sft_model, tok, n=n_eval)}
    del sft_model
    cfg = load_config("dpo", overrides=[f"model={start}", f"data.train={train_f}", f"data.eval={val_f}",
                                        f"output_dir={out / 'dpo'}", "train.progress=false",
                                        *stage_overrides("dpo"), *extra_overrides])
    t0 = time.time()
    res = dpo.run(cfg)
    train_time = time.time() - t0
    model = res.model.eval()
    m = {"preference_accuracy": held_out_pref_accuracy(model, tok, test_rows, beta=cfg.dpo.beta),
         "preference_correctness": gym.task_accuracy(model, tok, task="preference", split="test", n=n_eval),
         "regression_score": gym.regression_score(model, tok, n=n_eval),
         "sft_preference_correctness": sft["preference_correctness"],
         "sft_regression_score": sft["regression_score"],
         "train_time_s": round(train_time, 1), "run_dir": str(res.output_dir), "start_model": str(start),
         "adapter_dir": str(res.model_dir)}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def held_out_rm_score(policy, tokenizer, rm, prompts: list[str], *, max_new_tokens: int = 32, n: int = 2,
                      seed: int = 1, reference=None) -> dict:
    """Mean reward-model score of sampled completions of `prompts`, and (with `reference`) the mean
    per-completion KL(policy || reference), k1 on those samples."""
    ro = RolloutEngine(policy, tokenizer).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, n=n,
                                                                           seed=seed))
    out = {}
    with torch.no_grad():
        out["rm_score"] = float(reward_scores(rm, ro.input_ids, ro.attention_mask).mean())
        if reference is not None:
            b = ro.batch()
            d = (completion_logprobs(policy, b) - completion_logprobs(reference, b)) * b["completion_mask"]
            out["kl"] = float(d.sum(1).mean())
    return out


def ppo_row(start_model, out_dir, *, rm_steps: Optional[int] = None, ppo_steps: Optional[int] = None,
            n_eval: int = 64, reward_model: Optional[str] = None, extra_overrides: Sequence[str] = ()) -> dict:
    """The demo's `rm` then `ppo` rows from `start_model` on the preference prompts (`reward_model`:
    reuse a trained one instead). Returns {"rm_score_before", "rm_score", "gain", "kl", "train_time_s",
    "rm_dir", "run_dir", "model_dir"}, measured on samples for `n_eval` held-out (validation) prompts."""
    out = Path(out_dir)
    rm_dir = reward_model
    if rm_dir is None:
        steps = [f"train.max_steps={rm_steps}"] if rm_steps else []
        rm_cfg = load_config("reward", overrides=[f"model={start_model}", f"output_dir={out / 'rm'}",
                                                  "train.progress=false", *stage_overrides("rm", data=True), *steps])
        rm_dir = reward.run(rm_cfg).model_dir
    rm, _ = reward_model_from_lm(rm_dir, device="cpu")
    rm.eval()
    start, tok = load(start_model, device="cpu")
    prompts = [prompt_text(tok, r) for r in gym.load_task_rows("preference", "validation", n=n_eval)]
    before = held_out_rm_score(start.eval(), tok, rm, prompts)
    steps = [f"train.max_steps={ppo_steps}"] if ppo_steps else []
    ov = [o for o in stage_overrides("ppo", data=True) if not o.startswith("ppo.reward_model=")]
    cfg = load_config("ppo", overrides=[f"model={start_model}", f"output_dir={out / 'ppo'}", f"ppo.reward_model={rm_dir}",
                                        "train.progress=false", *ov, *steps, *extra_overrides])
    t0 = time.time()
    res = ppo.run(cfg)
    train_time = time.time() - t0
    after = held_out_rm_score(res.model.eval(), tok, rm, prompts, reference=start)
    return {"rm_score_before": round(before["rm_score"], 4), "rm_score": round(after["rm_score"], 4),
            "gain": round(after["rm_score"] - before["rm_score"], 4), "kl": round(after["kl"], 4),
            "train_time_s": round(train_time, 1), "rm_dir": str(rm_dir), "run_dir": str(out / "ppo"),
            "model_dir": str(res.model_dir)}
