"""Parameter-efficient adaptation: trainable parameters, adapter size, peak memory and tokens/s.

    python bench/adapters_throughput.py [--steps 30]

For the bundled base model and a ~30M-parameter Qwen2-shaped model, runs full fine-tuning,
LoRA, QLoRA, prompt tuning and prefix tuning with posttrain, and TRL's SFTTrainer with PEFT
LoRA side by side (same data, batch 8, max length 256, fp32, the same number of steps). Every
run is its own subprocess, so its peak RSS is its own. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sft_throughput import make_data, make_model, run_child

METHODS = ("none", "lora", "qlora", "prompt", "prefix")


def bench_model(work: Path, name: str, model: Path, steps: int) -> dict:
    train, train_pc, _ = make_data(work, 8 * steps, 8)
    common = dict(model=model, batch=8, max_length=256, precision="fp32", packing="false", max_steps=steps)
    rows = {}
    for m in METHODS:
        lr = 2e-5 if m == "none" else 2e-4
        r = run_child("posttrain", train=train, out=work / f"{name}-{m}", adapter=m, lr=lr, lora=0, **common)
        r["tokens_per_s"] = r["tokens"] / r["train_time_s"]
        rows[m] = r
    trl = run_child("trl", train=train_pc, out=work / f"{name}-trl", lr=2e-4, lora=1, **common)
    trl["tokens_per_s"] = trl["tokens"] / trl["train_time_s"]
    rows["trl_peft_lora"] = trl
    rows["lora_speedup_vs_trl"] = trl["train_time_s"] / rows["lora"]["train_time_s"]
    rows["lora_peak_rss_ratio_vs_trl"] = rows["lora"]["peak_rss_mb"] / trl["peak_rss_mb"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    from posttrain import gym

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    out = {"bundled": bench_model(work, "bundled", gym.base_model_path(), a.steps)}
    m30 = make_model(work / "m30", hidden=512, layers=8, heads=8, kv=8, inter=1536, vocab=4096)
    out["qwen2_30m"] = bench_model(work, "m30", m30, a.steps)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
