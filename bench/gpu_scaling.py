"""One GPU: posttrain vs TRL's SFTTrainer on a ~0.5B model in Qwen2-0.5B's shape (random weights).

    python bench/gpu_scaling.py            # on a CUDA device: tokens/s and peak GPU memory, full and LoRA
    python bench/gpu_scaling.py --tiny     # a tiny shape and 4 steps: checks the script end to end (runs on CPU)

No download: the config is written here with Qwen2-0.5B's published shape (24 layers, hidden 896,
14 query / 2 key-value heads, MLP 4864, vocabulary 151936, tied embeddings) and random weights;
the tokenizer is the small test tokenizer (its ids fall inside the vocabulary, and the
151936-wide output layer is computed in full either way).

Both trainers see the same work: rows of exactly `--seq` tokens (long random-word documents cut at
the length limit, so no padding and no packing), the same batch, bf16 autocast over fp32 master
weights, AdamW, constant lr, no activation checkpointing, all tokens trained. Each run is its own
subprocess (peak memory is its own). Steady tokens/s leaves out the first `--warmup` steps;
peak memory is `torch.cuda.max_memory_allocated` (peak RSS on CPU). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151936,
                 max_pos=32768, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_size=4096, max_pos=1024,
            tie_word_embeddings=True)


def make_model(out: Path, shape: dict) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
                      max_position_embeddings=shape["max_pos"], tie_word_embeddings=shape["tie_word_embeddings"],
                      rope_theta=shape.get("rope_theta", 10000.0), rms_norm_eps=shape.get("rms_norm_eps", 1e-6),
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_data(out: Path, rows: int, seq: int) -> Path:
    """Documents of random words, each well over `seq` tokens, so every row is cut at exactly `seq`."""
    rnd = random.Random(0)
    words = "the model learns to answer questions about numbers apples pears trains and rivers".split()
    f = out / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(2 * seq))}) + "\n"
                         for _ in range(rows)))
    return f


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_posttrain(a) -> dict:
    from posttrain.stages import load_config
    from posttrain.stages import sft

    over = [f"model={a.model}", f"data.train={a.data}", f"output_dir={a.out}", f"train.batch_size={a.batch}",
            f"data.max_length={a.seq}", "data.overflow=truncate", "train.lr=1e-5", "train.warmup_steps=0",
            "train.schedule=constant", f"train.max_steps={a.steps}", "train.progress=false",
            f"train.precision={a.precision}", "train.eval_every=null", "train.max_grad_norm=1.0"]
    if a.lora:
        over += ["adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "adapter.targets=all-linear", "train.lr=2e-4"]
    sft.run(load_config("sft", overrides=over))
    recs = [json.loads(line) for line in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["split"] == "train"][a.warmup:]
    return {"tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady),
            "steps_timed": len(steady)}


def child_trl(a) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=a.data, split="train")
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kw):
            tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kw)

    cfg = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-5,
                    max_length=a.seq, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    logging_steps=10, save_strategy="no", report_to=[], bf16=a.precision == "bf16",
                    use_cpu=not cuda, dataloader_num_workers=0, seed=0, packing=False, disable_tqdm=True,
                    dataset_text_field="text")
    peft_cfg = None
    if a.lora:
        from peft import LoraConfig

        peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        cfg.learning_rate = 2e-4
    trainer = CountingTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    trainer.add_callback(Timer())
    trainer.train()
    return {"tokens_per_s": sum(tokens[a.warmup:]) / sum(times[a.warmup:]), "steps_timed": len(times[a.warmup:])}


def run_child(kind: str, **kw) -> dict:
    args = [sys.executable, __file__, "--child", kind] + [f"--{k}={v}" for k, v in kw.items()]
    t0 = time.time()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_time_s"] = round(time.time() - t0, 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lora", type=int, default=0)
    p.add_argument("--precision", default="bf16")
    a = p.parse_args()
    if a.child:
        res = {"posttrain": child_posttrain, "trl": child_trl}[a.child](a)
        res["peak_memory_mb"] = round(_peak_memory_mb(), 1)
        print(json.dumps(res))
        return
    import torch

    if a.tiny:
        a.batch, a.seq, a.steps, a.warmup = 2, 64, 4, 1
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    shape = TINY if a.tiny else QWEN2_05B
    model = make_model(work / "model", shape)
    data = make_data(work, rows=a.batch * (a.steps + 2), seq=a.seq)
    n_params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"])
                   .load_file(str(model / "model.safetensors")).values())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = {"device": device, "shape": "tiny" if a.tiny else "Qwen2-0.5B", "params": n_params, "batch": a.batch,
           "seq": a.seq, "steps": a.steps, "warmup_excluded": a.warmup, "precision": a.precision,
           "memory": "torch.cuda.max_memory_allocated" if device != "cpu" else "peak RSS", "results": {}}
    common = dict(model=model, data=data, batch=a.batch, seq=a.seq, steps=a.steps, warmup=a.warmup,
                  precision=a.precision)
    for lora in (0, 1):
        tag = "lora" if lora else "full"
        ours = run_child("posttrain", out=work / f"pt-{tag}", lora=lora, **common)
        trl = run_child("trl", out=work / f"trl-{tag}", lora=lora, **common)
        out["results"][tag] = {"posttrain": ours, "trl": trl,
                               "speedup": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
                               "peak_memory_ratio": round(ours["peak_memory_mb"] / trl["peak_memory_mb"], 3)}
        print(json.dumps(out["results"][tag]), file=sys.stderr, flush=True)  # partial results if cut short
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
