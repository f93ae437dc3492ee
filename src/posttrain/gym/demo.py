"""`posttrain demo`: the post-training stack on the bundled base model, offline, on a CPU.

Stages (for now): base -> sft -> eval. Each stage is measured on the same held-out gym
split (task accuracy) and the same regression suite (general skills the base already
has), and the before/after table is printed and written to `summary.json` and
`report.html`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_STAGES = ("base", "sft")
ALL_STAGES = ("base", "sft", "dpo", "ppo")

# The SFT recipe the demo runs: LoRA on every linear layer, a short schedule.
SFT_OVERRIDES = [
    "adapter.type=lora", "adapter.r=16", "adapter.alpha=32",
    "train.lr=1e-3", "train.batch_size=16", "train.epochs=1", "train.max_steps=150",
    "train.schedule=cosine", "train.warmup_steps=10", "train.precision=bf16",
    "train.eval_every=50", "data.max_length=256",
    # 20% plain-text general data guards the regression score (without it: -16 points)
    "data.mix.data=gym:regression:train", "data.mix.ratio=0.2",
]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model, tok, *, n_task: int, n_reg: int) -> dict:
    from posttrain import gym

    t0 = time.time()
    acc = gym.task_accuracy(model, tok, task="instruct", split="test", n=n_task)
    reg = gym.regression_score(model, tok, n=n_reg)
    return {"task_accuracy": round(acc, 4), "regression_score": round(reg, 4), "eval_time_s": round(time.time() - t0, 1)}


def format_table(summary: dict) -> str:
    cols = ["task_accuracy", "regression_score"]
    extra = sorted({k for v in summary.values() for k in v if k not in cols and isinstance(v[k], (int, float))})
    head = ["stage"] + cols + extra
    rows = [head]
    for name, m in summary.items():
        rows.append([name] + [f"{m[c]:.3f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols + extra])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(out: Path, *, stages=DEFAULT_STAGES, n_train: int = 2400, n_task: int = 200, n_reg: int = 200,
             extra_overrides: tuple = ()) -> dict:
    import torch

    from posttrain import gym
    from posttrain.config import load_config
    from posttrain.models.loading import load
    from posttrain.report import build_report
    from posttrain.stages import sft

    torch.manual_seed(0)
    t_all = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base = gym.base_model_path()
    data_dir = out / "data"
    train_f = gym.export("instruct", "train", data_dir / "instruct-train.jsonl", n=n_train)
    val_f = gym.export("instruct", "validation", data_dir / "instruct-validation.jsonl", n=200)
    summary: dict[str, dict] = {}
    runs: dict[str, Path] = {}

    if "base" in stages:
        _say("[demo] base: evaluating the bundled pretrained model")
        model, tok = load(base, device="cpu")
        summary["base"] = measure(model, tok, n_task=n_task, n_reg=n_reg)
        _say(f"[demo] base: {summary['base']}")

    if "sft" in stages:
        _say("[demo] sft: LoRA supervised fine-tuning on gym instructions")
        cfg = load_config("sft", overrides=[f"model={base}", f"data.train={train_f}", f"data.eval={val_f}",
                                            f"output_dir={out / 'sft'}", *SFT_OVERRIDES, *extra_overrides])

        def task_eval(model, step):
            return {"task_accuracy": gym.task_accuracy(model, res_tok[0], task="instruct", split="validation", n=64)}

        from posttrain.stages.common import load_for_training

        model, tok = load_for_training(cfg)
        res_tok = [tok]
        t0 = time.time()
        res = sft.run(cfg, evaluators=[task_eval], model=model, tokenizer=tok)
        train_time = time.time() - t0
        model.eval()
        m = measure(res.model, tok, n_task=n_task, n_reg=n_reg)
        m["train_time_s"] = round(train_time, 1)
        m["final_train_loss"] = round(_last(res.output_dir, "train", "loss"), 4)
        summary["sft"] = m
        runs["sft"] = res.output_dir
        _say(f"[demo] sft: {m}")

    if "dpo" in stages or "ppo" in stages:
        if "sft" not in runs:
            raise ValueError("the dpo and ppo stages start from the sft stage's model: include sft in --stages")
        from posttrain.stages.dpo import starting_model

        start = starting_model(runs["sft"], out / "sft-merged")  # SFT adapter merged into the base

    if "dpo" in stages:
        from posttrain.stages import dpo

        _say("[demo] dpo: preference optimization on gym preference pairs (LoRA, reference = disabled adapter)")
        r = dpo.demo_stage(runs["sft"], out / "dpo-stage")
        model, tok = load(r["start_model"], adapter=r["adapter_dir"], device="cpu")
        m = measure(model, tok, n_task=n_task, n_reg=n_reg)
        m.update({k: r[k] for k in ("preference_accuracy", "preference_correctness", "sft_preference_correctness",
                                    "train_time_s")})
        summary["dpo"] = m
        runs["dpo"] = Path(r["run_dir"])
        _say(f"[demo] dpo: {m}")

    if "ppo" in stages:
        from posttrain.stages import ppo

        _say("[demo] ppo: RLHF against a reward model trained on gym preferences, KL-penalized")
        r = ppo.demo_stage(start, out / "ppo-stage")
        model, tok = load(r["model_dir"], device="cpu")
        m = measure(model, tok, n_task=n_task, n_reg=n_reg)
        m.update({"rm_score_before": r["rm_score_before"], "rm_score": r["rm_score"], "kl": r["kl"],
                  "train_time_s": r["train_time_s"]})
        summary["ppo"] = m
        runs["ppo"] = Path(r["run_dir"])
        _say(f"[demo] ppo: {m}")

    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    build_report(list(runs.values()) or [out], out / "report.html", title="posttrain demo",
                 summary=summary, stages=runs or None)
    wall = time.time() - t_all
    print(format_table(summary))
    print(f"\nwall time: {wall:.0f} s; summary: {summary_path}; report: {out / 'report.html'}")
    return summary


def _last(run_dir: Path, split: str, key: str) -> float:
    val = float("nan")
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == split and key in rec:
            val = rec[key]
    return val


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated stages among {','.join(ALL_STAGES)} (default: {','.join(DEFAULT_STAGES)})")
    p.add_argument("--forgetting", action="store_true",
                   help="instead: show catastrophic forgetting, a naive vs a guarded fine-tune (docs/eval.md)")
    a = p.parse_args(argv)
    if a.forgetting:
        from posttrain.eval import forgetting

        forgetting.run(Path(a.out))
        return 0
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; available: {', '.join(ALL_STAGES)}")
    out = Path(a.out)
    if (out / "sft" / "manifest.json").exists():
        p.error(f"{out} already holds a demo run; pass another --out or delete it")
    run_demo(out, stages=stages)
    return 0
