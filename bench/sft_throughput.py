"""SFT throughput, peak memory and packing efficiency: posttrain vs TRL's SFTTrainer, side by side.

    python bench/sft_throughput.py              # full comparison (~15 min on 2 idle cores)
    python bench/sft_throughput.py --quick      # fewer rows, one round, for a smoke run
    python bench/sft_throughput.py --threads 2  # OMP threads of every child (default 1)

Each trainer runs in its own subprocess (so peak RSS is its own) on the same model, data,
batch size, max length, learning rate, LoRA settings, precision and thread count. The runs are
interleaved (posttrain variants, TRL, posttrain variants, TRL, ...) for `--rounds` rounds and
medians are reported, so a load change on a shared machine hits both sides alike; `uptime`'s load
is recorded before and after. Held-out loss of every result is then measured by one function
(completion-token NLL) in this process. Prints JSON.

posttrain variants (all: batches of `batch` examples, one optimizer step each, as TRL):
- `padded`: right-padded batches (TRL's default collation).
- `padding_free`: `data.padding_free=true`, each batch as one row of its examples, no padding.
- `packed`: best-fit-decreasing rows of `max_length` tokens; the batch is then a number of rows,
  so it is set to `batch * mean example length / max_length` rows (a token budget close to the
  padded batch's real tokens), which keeps the number of optimizer steps comparable.

Peak RSS is the headline (ru_maxrss of the whole child). `rss_before_train_mb` is the RSS when
training starts (imports, model, data): `peak - before` is what training itself added.

MFU: 6 * params * tokens/s / (bf16 matmul FLOP/s measured in this run on 2048^3).
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

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- set-up

def make_model(out: Path, *, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int,
               head_vocab: int | None = None) -> Path:
    from posttrain import gym
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    corpus = [m["content"] for r in gym.load_task_rows("instruct", "train", n=2000) for m in r["messages"]]
    tok = build_tokenizer(vocab_size=vocab, corpus=corpus)
    return build_tiny_model("qwen2", out, tokenizer=tok, hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                            intermediate=inter, max_pos=1024, vocab_size=head_vocab)


def make_data(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path, Path]:
    from posttrain import gym

    def chats(split, n):
        return [{"messages": r["messages"]} for r in gym.load_task_rows("instruct", split, n=n)]

    train, held = chats("train", n_train), chats("validation", n_eval)
    f_msgs, f_pc, f_eval = out / "train.jsonl", out / "train_pc.jsonl", out / "eval.jsonl"
    f_msgs.write_text("".join(json.dumps(r) + "\n" for r in train))
    # the same conversations as prompt-completion: TRL trains completion tokens only in this form
    f_pc.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}) + "\n"
                            for r in train))
    f_eval.write_text("".join(json.dumps(r) + "\n" for r in held))
    return f_msgs, f_pc, f_eval


def bf16_peak_flops() -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    n, t = 6, time.perf_counter()
    for _ in range(n):
        a @ b
    return n * 2 * 2048 ** 3 / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- children

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_posttrain(a) -> dict:
    import torch

    from posttrain.stages import load_config
    from posttrain.engine.trainer import Engine
    from posttrain.stages import sft

    over = [f"model={a.model}", f"data.train={a.train}", f"output_dir={a.out}", f"train.batch_size={a.batch}",
            f"data.max_length={a.max_length}", f"train.lr={a.lr}", "train.epochs=1", f"train.precision={a.precision}",
            "train.progress=false", "train.warmup_steps=0", "train.schedule=constant", f"data.packing={a.packing}",
            "train.max_grad_norm=1.0", f"data.padding_free={a.padding_free or 'false'}"]
    adapter = a.adapter or ("lora" if a.lora else "none")
    if adapter != "none":
        over += [f"adapter.type={adapter}", "adapter.r=16", "adapter.alpha=32", "adapter.targets=all-linear",
                 "adapter.num_virtual_tokens=20"]
    if a.max_steps:
        over.append(f"train.max_steps={a.max_steps}")
    cfg = load_config("sft", overrides=over)
    before = {}
    fit = Engine.fit

    def timed_fit(self, *args, **kw):  # the RSS when training starts: imports, model, data
        before["rss"] = _rss_mb()
        return fit(self, *args, **kw)

    Engine.fit = timed_fit
    res = sft.run(cfg)
    r = res.result
    trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    size = sum(f.stat().st_size for f in res.model_dir.glob("*.safetensors"))
    return {"train_time_s": r["train_time_s"], "tokens": r["tokens_seen"], "steps": r["steps"],
            "packing_efficiency": r["data"].get("packing_efficiency"), "trainable_params": trainable,
            "saved_weights_bytes": size, "rss_before_train_mb": before["rss"], "torch_threads": torch.get_num_threads()}


def child_trl(a) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=a.train, split="train")
    cfg = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, num_train_epochs=1, learning_rate=a.lr,
                    max_length=a.max_length, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    logging_steps=50, save_strategy="no", report_to=[], bf16=a.precision == "bf16", use_cpu=True,
                    dataloader_num_workers=0, seed=0, packing=a.packing == "true", completion_only_loss=True,
                    disable_tqdm=True, max_steps=a.max_steps or -1)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if a.lora else None
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    before = _rss_mb()
    t0 = time.time()
    out = trainer.train()
    train_time = time.time() - t0
    # count real tokens the same way as posttrain: every non-pad input token of the steps taken
    seen = out.global_step * a.batch
    tokens = sum(len(row["input_ids"]) for i, row in enumerate(trainer.train_dataset) if i < seen)
    trainer.model.save_pretrained(a.out + "/final")
    tok.save_pretrained(a.out + "/final")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    size = sum(f.stat().st_size for f in Path(a.out, "final").glob("*.safetensors"))
    return {"train_time_s": train_time, "tokens": tokens, "steps": out.global_step,
            "trainable_params": trainable, "saved_weights_bytes": size, "rss_before_train_mb": before,
            "torch_threads": torch.get_num_threads()}


def run_child(kind: str, threads: int = 1, **kw) -> dict:
    args = [sys.executable, __file__, "--child", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_time_s"] = round(time.time() - t0, 2)
    return res


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- held-out loss

def heldout_loss(model_dir: str, adapter_dir: str | None, eval_file: Path, max_length: int) -> float:
    import torch

    import posttrain
    from posttrain.config import DataConfig
    from posttrain.data import build_dataset
    from posttrain.losses.sft import token_nll

    model, tok = posttrain.load(model_dir, adapter=adapter_dir, device="cpu")
    model.eval()
    b = build_dataset(DataConfig(train=str(eval_file), max_length=max_length), tok, stage="sft")
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(b.train), 16):
            batch = b.collate(b.train[i:i + 16])
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            s, c = token_nll(out.logits, batch["labels"])
            total, n = total + float(s), n + int(c)
    return total / n


# ----------------------------------------------------------------------------- main

VARIANTS = {"padded": dict(packing="false", padding_free="false"),
            "padding_free": dict(packing="false", padding_free="true"),
            "packed": dict(packing="true", padding_free="false")}


def _median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["train_times_s"] = [round(r["train_time_s"], 2) for r in runs]
    out["tokens_per_s"] = out["tokens"] / out["train_time_s"]
    out["train_rss_increment_mb"] = out["peak_rss_mb"] - out["rss_before_train_mb"]
    return out


def compare(work: Path, *, model: Path, train: Path, train_pc: Path, eval_f: Path, lora: bool, precision: str,
            batch: int, packed_batch: int, max_length: int, lr: float, rounds: int, threads: int,
            variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    common = dict(model=model, max_length=max_length, lr=lr, precision=precision, lora=int(lora), threads=threads)
    tag = f"{'lora' if lora else 'full'}-{precision}"
    runs: dict[str, list] = {k: [] for k in (*variants, "trl")}
    load = {"before": load_average()}
    for i in range(rounds):  # interleaved: a load change on the machine hits both sides alike
        for v in variants:
            kw = VARIANTS[v]
            runs[v].append(run_child("posttrain", train=train, out=work / f"pt-{v}-{tag}-{i}",
                                     batch=packed_batch if v == "packed" else batch, **kw, **common))
        runs["trl"].append(run_child("trl", train=train_pc, out=work / f"trl-{tag}-{i}", batch=batch,
                                     packing="false", **common))
    load["after"] = load_average()
    res = {k: _median(v) for k, v in runs.items()}
    # every round is seeded the same, so round 0's weights stand for all of them
    for v in variants:
        d = work / f"pt-{v}-{tag}-0" / ("adapter" if lora else "model")
        res[v]["heldout_loss"] = heldout_loss(str(model) if lora else str(d), str(d) if lora else None,
                                              eval_f, max_length)
    d = work / f"trl-{tag}-0" / "final"
    res["trl"]["heldout_loss"] = heldout_loss(str(model) if lora else str(d), str(d) if lora else None,
                                              eval_f, max_length)
    trl = res["trl"]
    ratios = {v: {"speedup_epoch_time": trl["train_time_s"] / res[v]["train_time_s"],
                  "peak_rss_ratio": res[v]["peak_rss_mb"] / trl["peak_rss_mb"],
                  "train_rss_increment_ratio": res[v]["train_rss_increment_mb"] / trl["train_rss_increment_mb"],
                  "heldout_loss_ratio": res[v]["heldout_loss"] / trl["heldout_loss"]} for v in variants}
    return {"setting": tag, "rounds": rounds, "load_average": load, **res, "vs_trl": ratios}


# self time of each profiled op, by the kind of work it does (first matching pattern wins)
OP_KINDS = (("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
            ("optimizer (foreach / fused kernels)", ("_foreach_", "_fused_adam")),
            ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
            ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone",
                                        "aten::contiguous")),
            ("output head and loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")))


def op_table(prof, wall_s: float) -> dict:
    """The profile's self CPU time per kind of op (OP_KINDS; the rest is element-wise and other
    small ops), with the ten largest ops."""
    kinds: dict = {}
    ops = []
    optimizer_s = 0.0
    for e in prof.key_averages():
        if e.key.startswith("Optimizer.step"):  # the AdamW step's scope: its ops' time, whatever their kind
            optimizer_s += e.cpu_time_total / 1e6
        t = e.self_cpu_time_total / 1e6
        kind = next((k for k, pats in OP_KINDS if any(p in e.key for p in pats)), "element-wise and other")
        kinds[kind] = kinds.get(kind, 0.0) + t
        ops.append((t, e.key, e.count))
    total = sum(kinds.values())
    return {"profiled_wall_s": round(wall_s, 2), "self_cpu_s": round(total, 2),
            "optimizer_step_s": round(optimizer_s, 2),  # inside the kinds below (per-tensor AdamW: element-wise)
            "kinds": {k: {"s": round(v, 2), "share": round(v / total, 3)} for k, v in
                      sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "s": round(t, 3), "calls": n} for t, k, n in sorted(ops, reverse=True)[:10]]}


def mfu(work: Path, quick: bool, threads: int, profile: bool = False) -> dict:
    """posttrain full fine-tuning of a ~30M-parameter Qwen2 in bf16 on packed rows."""
    import torch

    from posttrain.models.loading import load

    model = make_model(work / "m30", hidden=512, layers=8, heads=8, kv=8, inter=1536, vocab=4096)
    n_params = sum(p.numel() for p in load(model)[0].parameters())
    train = work / "cpt.jsonl"
    from posttrain import gym

    texts = [r["prompt"] + r["completion"] for r in gym.load_task_rows("regression", "train", n=1500)] * 3
    train.write_text("".join(json.dumps({"text": " ".join(texts[i:i + 40])}) + "\n" for i in range(0, len(texts), 40)))
    torch.set_num_threads(threads)  # the matmul rate with the training child's thread count
    # the peak is measured right before and right after the run; the higher one is the reference
    peak = bf16_peak_flops()
    extra = {"profile": "1"} if profile else {}
    r = run_child("posttrain-cpt", threads=threads, model=model, train=train, out=work / "pt-mfu", batch=4,
                  max_length=512, lr=1e-4, precision="bf16", lora=0, max_steps=8 if quick else 20, **extra)
    peak = max(peak, bf16_peak_flops())
    flops = 6 * n_params * r["tokens_per_s_steady"]
    return {"params": n_params, "threads": threads, "bf16_peak_gflops": peak / 1e9,
            "tokens_per_s": r["tokens_per_s_steady"], "model_gflops": flops / 1e9, "mfu": flops / peak,
            "load_average": load_average(), **({"profile": r["profile"]} if profile else {})}


def child_cpt(a) -> dict:
    from posttrain.stages import load_config
    from posttrain.stages import cpt

    cfg = load_config("cpt", overrides=[f"model={a.model}", f"data.train={a.train}", f"output_dir={a.out}",
                                        f"train.batch_size={a.batch}", f"data.max_length={a.max_length}",
                                        f"train.lr={a.lr}", f"train.precision={a.precision}", "train.progress=false",
                                        f"train.max_steps={a.max_steps}"])
    if a.profile:  # the profiler records the steady optimizer steps only (from the third to the last)
        from torch.profiler import ProfilerActivity, profile

        from posttrain.engine.trainer import Engine

        prof, plain_step, calls = profile(activities=[ProfilerActivity.CPU]), Engine._train_step, [0]

        def profiled_step(self):
            calls[0] += 1
            if calls[0] == 3:
                prof.start()
            out = plain_step(self)
            if calls[0] == a.max_steps:
                prof.stop()
            return out

        Engine._train_step = profiled_step
    cpt.run(cfg)
    recs = [json.loads(l) for l in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["split"] == "train"][2:]  # skip warm-up steps
    out = {"tokens_per_s_steady": sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady)}
    if a.profile:
        out["profile"] = op_table(prof, sum(r["step_time_s"] for r in steady))
    return out


def mean_example_tokens(model: Path, train: Path, max_length: int) -> float:
    import posttrain
    from posttrain.config import DataConfig
    from posttrain.data import build_dataset

    tok = posttrain.load(model)[1]
    items = build_dataset(DataConfig(train=str(train), max_length=max_length), tok, stage="sft").train
    return sum(len(x.input_ids) for x in items) / len(items)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-mfu", action="store_true")
    p.add_argument("--profile-mfu", action="store_true", help="only the MFU run, under torch.profiler: self time "
                   "by kind of op (matmul, attention, optimizer, casts, element-wise)")
    p.add_argument("--profile", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["lora", "full"], help="run one setting only")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of every child, both sides")
    p.add_argument("--variants", default=",".join(VARIANTS), help="posttrain variants to run, comma-separated")
    for k in ("model", "train", "out", "precision", "packing", "adapter", "padding-free"):
        p.add_argument(f"--{k}")
    for k in ("batch", "max-length", "lora", "max-steps"):
        p.add_argument(f"--{k}", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--head-vocab", type=int, default=None,
                   help="widen the model's embedding/output head to this many rows (the tokenizer keeps 1024 "
                        "tokens), e.g. 32768 for a Llama-2/Mistral-sized head; default: 1024")
    a = p.parse_args()
    if a.child:
        fn = {"posttrain": child_posttrain, "trl": child_trl, "posttrain-cpt": child_cpt}[a.child]
        res = fn(a)
        res["peak_rss_mb"] = _rss_mb()
        print(json.dumps(res))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    if a.profile_mfu:
        print(json.dumps({"mfu_30m_bf16": mfu(work, a.quick, a.threads, profile=True)}, indent=1))
        return
    n_train = 400 if a.quick else 1600
    rounds = 1 if a.quick else a.rounds
    model = make_model(work / "m4", hidden=256, layers=4, heads=4, kv=2, inter=768, vocab=1024,
                       head_vocab=a.head_vocab)
    train, train_pc, eval_f = make_data(work, n_train, 200)
    batch, max_length = 8, 256
    mean_len = mean_example_tokens(model, train, max_length)
    # packed rows per step: about the real tokens of a padded batch (a token budget, not a row count)
    packed_batch = max(1, round(batch * mean_len / max_length))
    settings = dict(model=model, train=train, train_pc=train_pc, eval_f=eval_f, batch=batch, max_length=max_length,
                    packed_batch=packed_batch, rounds=rounds, threads=a.threads,
                    variants=tuple(v for v in a.variants.split(",") if v))
    out = {"machine": {"cpus": os.cpu_count(), "omp_threads_per_child": a.threads}, "n_train": n_train,
           "head_vocab": a.head_vocab or 1024,
           "batch": batch, "max_length": max_length, "mean_example_tokens": mean_len, "packed_rows_per_step": packed_batch,
           "results": []}
    if a.only in (None, "lora"):
        out["results"].append(compare(work, lora=True, precision="fp32", lr=2e-4, **settings))
        print(json.dumps(out, indent=1), flush=True)
    if a.only in (None, "full"):
        out["results"].append(compare(work, lora=False, precision="fp32", lr=2e-5, **settings))
        print(json.dumps(out, indent=1), flush=True)
    if not a.skip_mfu:
        print(json.dumps({"mfu_30m_bf16": mfu(work, a.quick, a.threads)}, indent=1))


if __name__ == "__main__":
    main()
