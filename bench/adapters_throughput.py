"""Parameter-efficient adaptation: trainable parameters, adapter size, peak memory and tokens/s.

    python bench/adapters_throughput.py [--steps 30] [--rounds 1] [--threads 1]

For the bundled base model and a ~30M-parameter Qwen2-shaped model (and, with `--only
qwen2_head32k`, a small body with a Llama-2/Mistral-sized 32,768-row head), runs full fine-tuning,
LoRA, QLoRA, prompt tuning and prefix tuning with posttrain, and TRL's SFTTrainer with PEFT
LoRA side by side (same data, batch 8, max length 256, fp32, the same number of steps, the
same OMP thread count). Every run is its own subprocess, so its peak RSS is its own; each
round runs every method and then TRL, and with `--rounds` > 1 the medians are reported.

posttrain runs full fine-tuning, LoRA and QLoRA with `data.padding_free=true` (the same batches
as TRL's padded ones, without the padding tokens); prompt and prefix tuning add their virtual
tokens per row, so they run padded. `lora_padded` is LoRA on padded batches, for reference.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from sft_throughput import load_average, make_data, make_model, run_child

# method -> (adapter.type, data.padding_free)
METHODS = {"full": ("none", "true"), "lora": ("lora", "true"), "lora_padded": ("lora", "false"),
           "qlora": ("qlora", "true"), "prompt": ("prompt", "false"), "prefix": ("prefix", "false")}


def _median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["tokens_per_s"] = out["tokens"] / out["train_time_s"]
    out["adapter_mb"] = out.pop("saved_weights_bytes") / 2 ** 20
    return out


def bench_model(work: Path, name: str, model: Path, steps: int, rounds: int, threads: int) -> dict:
    train, train_pc, _ = make_data(work, 8 * steps, 8)
    common = dict(model=model, batch=8, max_length=256, precision="fp32", packing="false", max_steps=steps,
                  threads=threads)
    runs: dict[str, list] = {m: [] for m in (*METHODS, "trl_peft_lora")}
    load = {"before": load_average()}
    for i in range(rounds):
        for m, (adapter, padding_free) in METHODS.items():
            lr = 2e-5 if adapter == "none" else 2e-4
            runs[m].append(run_child("posttrain", train=train, out=work / f"{name}-{m}-{i}", adapter=adapter, lr=lr,
                                     lora=0, padding_free=padding_free, **common))
        runs["trl_peft_lora"].append(run_child("trl", train=train_pc, out=work / f"{name}-trl-{i}", lr=2e-4, lora=1,
                                               **common))
    load["after"] = load_average()
    rows = {m: _median(r) for m, r in runs.items()}
    trl = rows["trl_peft_lora"]
    for m in METHODS:
        rows[m]["speedup_vs_trl_lora"] = trl["train_time_s"] / rows[m]["train_time_s"]
        rows[m]["peak_rss_ratio_vs_trl_lora"] = rows[m]["peak_rss_mb"] / trl["peak_rss_mb"]
    return {"rounds": rounds, "steps": steps, "load_average": load, **rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of every child, both sides")
    p.add_argument("--only", choices=["bundled", "qwen2_30m", "qwen2_head32k"])
    a = p.parse_args()
    from posttrain import gym

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    out = {"omp_threads_per_child": a.threads}
    if a.only in (None, "bundled"):
        out["bundled"] = bench_model(work, "bundled", gym.base_model_path(), a.steps, a.rounds, a.threads)
        print(json.dumps(out, indent=1), flush=True)
    if a.only in (None, "qwen2_30m"):
        m30 = make_model(work / "m30", hidden=512, layers=8, heads=8, kv=8, inter=1536, vocab=4096)
        out["qwen2_30m"] = bench_model(work, "m30", m30, a.steps, a.rounds, a.threads)
        print(json.dumps(out, indent=1), flush=True)
    if a.only == "qwen2_head32k":  # opt-in: the 3.7M body of bench/sft_throughput.py with a 32,768-row head
        m = make_model(work / "h32k", hidden=256, layers=4, heads=4, kv=2, inter=768, vocab=1024, head_vocab=32768)
        out["qwen2_head32k"] = bench_model(work, "h32k", m, a.steps, a.rounds, a.threads)
        print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
