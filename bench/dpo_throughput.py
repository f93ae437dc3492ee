"""DPO throughput and peak memory with LoRA: posttrain (reference = disabled adapter, or precomputed)
side by side with TRL's DPOTrainer + PEFT, on the same tiny model, data, batch and step count.

Each configuration runs in its own subprocess so that its peak RSS (ru_maxrss) is its own.
Prints one JSON object. Usage:

    python bench/dpo_throughput.py [--steps 30] [--batch 8] [--max-length 256] [--pairs 400]
        [--configs posttrain-adapter,posttrain-adapter-pf,posttrain-precomputed-pf,trl-adapter,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("posttrain-adapter", "posttrain-precomputed", "trl-adapter", "trl-precomputed")
# posttrain-*-pf: the same with data.padding_free (the batch's pairs side by side in one row)


def _rows(n: int) -> list[dict]:
    from posttrain import gym

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in gym.load_task_rows("preference", "train", n=n)]


def setup(work: Path, a) -> tuple[Path, Path]:
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    model_dir = work / "model"
    # about 3.7M parameters, Qwen2-shaped (GQA), like the reference measurements
    build_tiny_model("qwen2", model_dir, tokenizer=build_tokenizer(), hidden=256, layers=4, heads=8, kv_heads=4,
                     intermediate=688, max_pos=1024)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(a.pairs)))
    return model_dir, data


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_posttrain(mode: str, model_dir: Path, data: Path, out: Path, a) -> dict:
    from posttrain.stages import load_config
    from posttrain.stages import dpo

    padding_free = mode.endswith("-pf")
    mode = mode.removesuffix("-pf")
    cfg = load_config("dpo", overrides=[
        f"model={model_dir}", f"data.train={data}", f"output_dir={out}", f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch}", f"data.max_length={a.max_length}", "train.lr=5e-4", "train.progress=false",
        "adapter.type=lora", "adapter.r=16", "adapter.alpha=32", f"dpo.reference={mode}", "train.device=cpu",
        f"data.padding_free={str(padding_free).lower()}"])
    t0 = time.perf_counter()
    res = dpo.run(cfg)
    return {"train_s": res.result["train_time_s"], "steps": res.result["steps"],
            "process_s": time.perf_counter() - t0}


def worker_trl(mode: str, model_dir: Path, data: Path, out: Path, a) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=5e-4,
                     max_length=a.max_length, logging_steps=a.steps, save_strategy="no", report_to=[], use_cpu=True,
                     precompute_ref_log_probs=mode == "precomputed", disable_tqdm=True, dataloader_num_workers=0)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    out_metrics = trainer.train().metrics
    return {"train_s": out_metrics["train_runtime"], "steps": a.steps, "process_s": time.perf_counter() - t0}


def run_worker(name: str, model_dir: Path, data: Path, work: Path, a) -> dict:
    lib, mode = name.split("-", 1)
    fn = worker_posttrain if lib == "posttrain" else worker_trl
    r = fn(mode, model_dir, data, work / name, a)
    r.update(config=name, steps_per_s=round(r["steps"] / r["train_s"], 3), peak_rss_mib=round(_peak_rss_mib(), 1),
             train_s=round(r["train_s"], 2), process_s=round(r["process_s"], 2))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        work = Path(a.work)
        print("RESULT " + json.dumps(run_worker(a.worker, work / "model", work / "pairs.jsonl", work, a)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(work, a)
        results = {}
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        for name in a.configs.split(","):
            cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--max-length", str(a.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                results[name] = {"error": (proc.stderr or proc.stdout)[-800:]}
            else:
                results[name] = json.loads(line[len("RESULT "):])
            print(f"[bench] {name}: {results[name]}", file=sys.stderr, flush=True)
    summary = {"model": "qwen2 tiny (hidden 256, 4 layers), fp32, LoRA r=16 all-linear", "batch": a.batch,
               "max_length": a.max_length, "steps": a.steps, "results": results}
    trl = results.get("trl-adapter", {})
    for name in [c for c in a.configs.split(",") if c.startswith("posttrain-")]:
        r = results.get(name, {})
        if "steps_per_s" in r and "steps_per_s" in trl:
            summary[f"{name}_vs_trl"] = {"speed_x": round(r["steps_per_s"] / trl["steps_per_s"], 2),
                                         "memory_x": round(r["peak_rss_mib"] / trl["peak_rss_mib"], 2)}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
