"""The planner against real runs: predicted vs measured peak memory and step time on this CPU.

    OMP_NUM_THREADS=1 python bench/plan_accuracy.py [--only N,M] [--steps 4] [--work DIR]
    OMP_NUM_THREADS=1 python bench/plan_accuracy.py --qlora-vs-lora 3   # peaks, alternated, 3 runs each
    python bench/plan_accuracy.py --device cuda                           # on a GPU: GPU_CONFIGS, ~6 minutes

Each configuration runs in its own child process (one OpenMP thread): posttrain's own training
path (`load_for_training`, the SFT data pipeline, `Engine.fit`) for a few optimizer steps.

Measured memory = peak RSS of the child during loading and training (VmHWM, reset just before the
model is built) minus its RSS at that moment (after imports and nothing else). Measured step time =
the median over the steps after the first (the first pays lazy initialisation) of the training
thread's CPU time per optimizer step (one OpenMP thread, so all compute runs on that thread): on a
shared machine the wall clock also counts the time other processes hold the core; the wall-clock
medians (`measured_wall_step_s`) are printed beside it. Prints one JSON object per configuration and a summary with the errors; the
utilisation factors are fitted on the calibration runs (`calibrate: true`) and the summary reports
the errors of the other runs separately.

On a GPU (`--device cuda`) the configurations are GPU_CONFIGS, at the shapes users train (a
Qwen2-0.5B and a Llama-3.2-1B shape, random weights built locally, bf16, 2k tokens), and the measures
are the CUDA allocator's: measured memory = `torch.cuda.max_memory_allocated()` during loading and
training minus `torch.cuda.memory_allocated()` before the model is built, against the planner's
prediction without its `runtime` term (the CUDA context, which the allocator does not count); step
time = the wall clock per optimizer step (synchronised), against the planner's GPU utilisation
factors. Nothing is fitted on a GPU: the summary reports the errors and the utilisation the runs
imply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (arch, vocab, hidden, layers, heads, kv_heads, intermediate)
    "llama-56M": ("llama", 32000, 512, 8, 8, 4, 1408),
    "qwen2-81M": ("qwen2", 151936, 256, 4, 4, 2, 768),
    "gemma-38M": ("gemma", 65536, 384, 6, 6, 2, 1536),
}

# (shape, adapter, seq_len, batch, gradient checkpointing, precision, calibrate)
CONFIGS = [
    ("llama-56M", "none", 128, 4, False, "fp32", True),
    ("llama-56M", "none", 512, 2, False, "fp32", False),
    ("llama-56M", "none", 512, 2, True, "fp32", True),
    ("llama-56M", "lora", 512, 2, False, "fp32", False),
    ("llama-56M", "qlora", 512, 2, False, "fp32", True),
    ("llama-56M", "prompt", 512, 2, False, "fp32", False),
    ("qwen2-81M", "none", 128, 4, False, "fp32", False),
    ("qwen2-81M", "lora", 128, 4, False, "fp32", True),
    ("qwen2-81M", "lora", 512, 2, True, "fp32", False),
    ("qwen2-81M", "qlora", 512, 2, False, "fp32", False),
    ("qwen2-81M", "prompt", 128, 4, False, "fp32", True),
    ("gemma-38M", "none", 512, 2, False, "fp32", False),
    ("gemma-38M", "lora", 512, 2, False, "fp32", True),
    ("gemma-38M", "lora", 512, 2, True, "fp32", False),
    ("gemma-38M", "qlora", 128, 4, False, "fp32", False),
    ("gemma-38M", "none", 128, 4, True, "fp32", False),
]

# On a GPU (--device cuda): shapes of the size users train (random weights, built on that machine)
GPU_SHAPES = {
    "qwen2-0.5B": ("qwen2", 151936, 896, 24, 14, 2, 4864),
    "llama-1.5B": ("llama", 128256, 2048, 16, 32, 8, 8192),
}
GPU_CONFIGS = [
    ("qwen2-0.5B", "none", 2048, 4, False, "bf16", False),
    ("qwen2-0.5B", "none", 2048, 4, True, "bf16", False),
    ("qwen2-0.5B", "lora", 2048, 4, False, "bf16", False),
    ("qwen2-0.5B", "lora", 2048, 8, True, "bf16", False),
    ("qwen2-0.5B", "qlora", 2048, 4, True, "bf16", False),
    ("qwen2-0.5B", "prompt", 1024, 4, False, "bf16", False),
    ("qwen2-0.5B", "none", 1024, 8, False, "fp32", False),
    ("llama-1.5B", "none", 2048, 2, True, "bf16", False),
    ("llama-1.5B", "lora", 2048, 4, False, "bf16", False),
    ("llama-1.5B", "lora", 2048, 4, True, "bf16", False),
    ("llama-1.5B", "qlora", 2048, 4, True, "bf16", False),
    ("llama-1.5B", "none", 1024, 4, False, "bf16", False),
]
GPU_WORDS_PER_ROW = 3000  # rows longer than 2,048 tokens, so every row is full as the planner assumes

# QLoRA against LoRA, the same peak measure (--qlora-vs-lora): (shape, seq_len, batch); "gym-1.9M" is
# the bundled base model (posttrain.gym.base_model_path())
QLORA_VS_LORA = [("llama-56M", 128, 1), ("llama-56M", 512, 2), ("gym-1.9M", 128, 1)]

TOKENIZER_ROWS = 512  # posttrain.models.tiny's tokenizer: the only embedding rows the data can read

WORDS = ("the model learns post training data token answer question value system user assistant tool "
         "apple paris number seven eleven reverse quick brown fox jumps lazy dog").split()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":"))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over execve from the parent."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def build_assets(work: Path, gpu: bool = False) -> None:
    import random

    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    for name, (arch, vocab, d, layers, heads, kv, f) in (GPU_SHAPES if gpu else SHAPES).items():
        out = work / name
        if not (out / "config.json").exists():
            extra = {"head_dim": d // heads} if arch == "gemma" else {}
            build_tiny_model(arch, out, tokenizer=tok, vocab_size=vocab, hidden=d, layers=layers, heads=heads,
                             kv_heads=kv, intermediate=f, max_pos=4096 if gpu else 1024, **extra)
    data = work / ("text-long.jsonl" if gpu else "text.jsonl")
    if not data.exists():
        rng = random.Random(0)
        with data.open("w") as fh:
            for _ in range(64):
                words = GPU_WORDS_PER_ROW if gpu else 900
                fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def model_dir(work: Path, shape: str) -> Path:
    if shape == "gym-1.9M":
        from posttrain.gym import base_model_path

        return Path(base_model_path())
    return work / shape


class Meter:
    """The measures of one run: on the CPU the process's RSS (VmHWM reset through clear_refs) and this
    thread's CPU time; on a GPU the CUDA allocator's bytes and the synchronised wall clock."""

    def __init__(self, gpu: bool):
        import torch

        self.gpu, self.torch = gpu, torch

    def reset(self) -> int:
        """Start a new peak here; returns the current bytes (the baseline)."""
        if self.gpu:
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated()
        reset_peak_rss()
        return rss_bytes()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.gpu else peak_rss_bytes()

    def clock(self) -> float:
        if self.gpu:
            self.torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()


def child(spec: dict) -> dict:
    """One configuration, in this process: load, build the data, train `steps` steps, measure."""
    import torch

    torch.set_num_threads(1)
    from posttrain.config import load_config
    from posttrain.engine.trainer import Engine
    from posttrain.engine.setup import load_for_training
    from posttrain.stages.sft import LMStage, lm_data

    gpu = spec.get("device", "cpu") == "cuda"
    work, out = Path(spec["work"]), Path(spec["out"])
    ov = [f"model={model_dir(work, spec['shape'])}", f"data.train={work / ('text-long.jsonl' if gpu else 'text.jsonl')}",
          f"output_dir={out}",
          f"data.max_length={spec['seq_len']}", f"train.batch_size={spec['batch']}",
          f"train.max_steps={spec['steps']}", f"adapter.type={spec['adapter']}", "train.progress=false",
          f"train.gradient_checkpointing={str(spec['ckpt']).lower()}", f"train.precision={spec['precision']}",
          f"train.device={'cuda' if gpu else 'cpu'}", "train.warmup_steps=0"]
    if gpu:
        ov += ["eval.guard=off"]  # the measure is the training run's; the guard's reference is its own cost
    cfg = load_config("sft", None, ov)
    device = torch.device("cuda" if gpu else "cpu")
    meter = Meter(gpu)
    before = meter.reset()
    model, tok = load_for_training(cfg, device)
    load_peak = meter.peak()
    data = lm_data(cfg, tok)
    at_step = []  # the meter's clock at each optimizer step
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(lambda *_: at_step.append(meter.clock()))
    meter.reset()  # from here the peak is the training peak alone
    start = meter.clock()
    Engine(model, LMStage("sft"), data, cfg, device=device).fit()
    peak = max(load_peak, meter.peak())
    hook.remove()
    step_s = [b - a for a, b in zip([start] + at_step, at_step)]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in steps if m.get("split") == "train"]
    return {"measured_peak_bytes": peak - before, "measured_load_peak_bytes": load_peak - before,
            ("allocated_before_model" if gpu else "rss_before_model"): before, "step_times_s": times,
            ("step_synchronised_s" if gpu else "step_cpu_s"): step_s,
            "measured_wall_step_s": statistics.median(times[1:] if len(times) > 1 else times),
            "measured_step_s": statistics.median(step_s[1:] if len(step_s) > 1 else step_s),
            **({"device_name": torch.cuda.get_device_name(), "device_memory_bytes":
                torch.cuda.get_device_properties(0).total_memory} if gpu else {})}


def gpu_device_for(name: str, memory_bytes: int):
    """The planner's table entry for a CUDA device name ("NVIDIA H100 80GB HBM3" -> H100-80GB); None if unknown."""
    from posttrain.plan.devices import DEVICES

    for key, dev in DEVICES.items():
        family = key.split("-")[0]
        if family.lower() in name.lower().replace(" ", "") and abs(dev.memory_bytes - memory_bytes) < 0.15 * dev.memory_bytes:
            return dev
    return None


def predict(spec: dict, work: Path, utilisation=None) -> dict:
    """The planner's figures for one configuration. On a GPU the peak leaves out the `runtime` term (the CUDA
    context), which `torch.cuda.max_memory_allocated` does not count."""
    from posttrain.plan.devices import cpu_device, get_device
    from posttrain.plan.memory import RunSpec, estimate_memory
    from posttrain.plan.shapes import read_shape
    from posttrain.plan.speed import step_time

    gpu = spec.get("device", "cpu") == "cuda"
    shape = read_shape(model_dir(work, spec["shape"]))
    rs = RunSpec(adapter=spec["adapter"], batch_size=spec["batch"], seq_len=spec["seq_len"],
                 precision=spec["precision"], gradient_checkpointing=spec["ckpt"], device_kind="gpu" if gpu else "cpu",
                 embedding_rows=None if gpu else TOKENIZER_ROWS)
    mem = estimate_memory(shape, rs)
    if gpu:
        dev = gpu_device_for(spec.get("device_name", ""), spec.get("device_memory_bytes", 0)) or get_device("H100-80GB")
        peak = mem.peak_bytes - mem.breakdown["runtime"]
    else:
        dev, peak = cpu_device(threads=1), mem.peak_bytes
    return {"predicted_peak_bytes": peak, "predicted_step_s": step_time(shape, rs, dev, utilisation),
            "predicted_phase": mem.peak_phase, "breakdown": mem.breakdown, "params": shape.total_params,
            "planner_device": dev.name}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "posttrain-plan-bench"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", default=None, help="comma-separated config indices")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help="re-score saved results (JSONL) instead of running")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: GPU_CONFIGS on the first GPU, against torch.cuda.max_memory_allocated")
    p.add_argument("--qlora-vs-lora", type=int, default=0, metavar="RUNS",
                   help="measure LoRA's and QLoRA's peaks RUNS times each, alternated (QLORA_VS_LORA shapes)")
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    gpu = a.device == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"plan_accuracy: --device cuda, but torch {torch.__version__} sees no CUDA device")
    build_assets(work, gpu=gpu)
    if a.qlora_vs_lora:
        compare_qlora(work, a.qlora_vs_lora, a.steps)
        return
    rows = []
    if a.results:
        rows = [json.loads(x) for x in Path(a.results).read_text().splitlines() if x.strip()]
    else:
        configs = GPU_CONFIGS if gpu else CONFIGS
        idx = [int(i) for i in a.only.split(",")] if a.only else range(len(configs))
        for i in idx:
            shape, adapter, seq, batch, ckpt, prec, calib = configs[i]
            spec = {"index": i, "shape": shape, "adapter": adapter, "seq_len": seq, "batch": batch, "ckpt": ckpt,
                    "precision": prec, "calibrate": calib, "steps": a.steps, "work": str(work),
                    "out": str(work / f"run-{i}-{time.time_ns()}"), "device": a.device}
            row = run_child(spec)
            if row is not None:
                rows.append(row)
    summarize(rows, work)


def run_child(spec: dict):
    """One configuration in a child process (one OpenMP thread); the row printed and returned (None: failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(json.dumps({"index": spec["index"], "error": proc.stderr[-2000:]}), flush=True)
        return None
    row = {**spec, **json.loads(line[7:]), "load_average": os.getloadavg()}
    print(json.dumps(row), flush=True)
    return row


def compare_qlora(work: Path, runs: int, steps: int) -> None:
    """LoRA's and QLoRA's measured peaks (the docs' measure) on each QLORA_VS_LORA shape, `runs` each,
    alternated so that both see the same machine; then the medians, spreads and predictions."""
    out = []
    for shape, seq, batch in QLORA_VS_LORA:
        got = {"lora": [], "qlora": []}
        for i in range(runs):
            for adapter in ("lora", "qlora"):
                spec = {"index": f"{shape}-{adapter}-{i}", "shape": shape, "adapter": adapter, "seq_len": seq,
                        "batch": batch, "ckpt": False, "precision": "fp32", "calibrate": False, "steps": steps,
                        "work": str(work), "out": str(work / f"cmp-{shape}-{adapter}-{time.time_ns()}")}
                row = run_child(spec)
                if row is not None:
                    got[adapter].append(row)
        summary = {"shape": shape, "seq_len": seq, "batch": batch}
        for adapter, rows in got.items():
            mib = [r["measured_peak_bytes"] / 2**20 for r in rows]
            load = [r["measured_load_peak_bytes"] / 2**20 for r in rows]
            pred = predict(rows[0], work)["predicted_peak_bytes"] / 2**20 if rows else None
            summary[adapter] = {"peak_MiB": [round(x, 1) for x in mib], "median_MiB": round(statistics.median(mib), 1),
                                "load_peak_MiB": [round(x, 1) for x in load], "predicted_MiB": round(pred, 1),
                                "load_average_1min": [round(r["load_average"][0], 1) for r in rows]}
        out.append(summary)
        print(json.dumps({"qlora_vs_lora": summary}), flush=True)


def fit(rows: list[dict], work: Path) -> dict:
    """The CPU constants fitted on the calibration runs only: the runtime memory term (the median of
    measured minus predicted-without-it) and the matmul and attention utilisation (least squares of
    the measured step time on the FLOPs, after the streamed bytes)."""
    import numpy as np

    from posttrain.plan.devices import cpu_device
    from posttrain.plan.memory import RunSpec, cpu_transient_bytes, estimate_memory
    from posttrain.plan.shapes import read_shape
    from posttrain.plan.speed import UTILISATION, step_flops, trainable_params

    cal = [r for r in rows if r["calibrate"]]
    dev = cpu_device(threads=1)
    extra, A, y = [], [], []
    for r in cal:
        shape = read_shape(work / r["shape"])
        rs = RunSpec(adapter=r["adapter"], batch_size=r["batch"], seq_len=r["seq_len"], precision=r["precision"],
                     gradient_checkpointing=r["ckpt"], device_kind="cpu", embedding_rows=TOKENIZER_ROWS)
        mem = estimate_memory(shape, rs)
        runtime = mem.breakdown["runtime"]
        peak = max(mem.train_peak_bytes, mem.load_peak_bytes)  # the measure spans loading and training
        extra.append((r["measured_peak_bytes"] - (peak - runtime), cpu_transient_bytes(shape, rs)))
        f = step_flops(shape, rs)
        stream = (f.streamed_bytes + 28 * trainable_params(shape, rs)) / (dev.bandwidth * UTILISATION["cpu"]["stream"])
        A.append([f.matmul / dev.peak_flops(r["precision"]), f.attention / dev.peak_flops(r["precision"])])
        y.append(r["measured_step_s"] - stream)
    # one factor for all FLOPs: on 6 runs the attention term cannot be told apart from the matmuls
    (a,), *_ = np.linalg.lstsq(np.array([[m + at] for m, at in A]), np.array(y), rcond=None)
    (c0, c1), *_ = np.linalg.lstsq(np.array([[1.0, w] for _, w in extra]), np.array([e for e, _ in extra]),
                                   rcond=None)
    return {"cpu_runtime_bytes": float(c0), "cpu_retained_fraction": float(c1),
            "matmul_and_attention": 1 / a,
            "calibration_runs": len(cal)}


def summarize(rows: list[dict], work: Path) -> None:
    from posttrain.plan.speed import UTILISATION

    gpu = any(r.get("device") == "cuda" for r in rows)
    if not gpu:  # the CPU constants are fitted here; on a GPU the published factors are checked, not fitted
        print(json.dumps({"fitted_on_calibration_runs": fit(rows, work)}))

    table = []
    for r in rows:
        pred = predict(r, work, UTILISATION["gpu" if gpu else "cpu"])
        mem_err = (pred["predicted_peak_bytes"] - r["measured_peak_bytes"]) / r["measured_peak_bytes"]
        t_err = (pred["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"]
        table.append({"index": r["index"], "shape": r["shape"], "adapter": r["adapter"], "seq_len": r["seq_len"],
                      "batch": r["batch"], "ckpt": r["ckpt"], "precision": r["precision"],
                      "calibrate": r["calibrate"],
                      "measured_MiB": round(r["measured_peak_bytes"] / 2**20),
                      "predicted_MiB": round(pred["predicted_peak_bytes"] / 2**20),
                      "mem_err": round(mem_err, 3), "measured_step_s": round(r["measured_step_s"], 3),
                      "measured_wall_step_s": round(r.get("measured_wall_step_s", float("nan")), 3),
                      "load_average_1min": round(r["load_average"][0], 1),
                      "predicted_step_s": round(pred["predicted_step_s"], 3), "time_err": round(t_err, 3),
                      "phase": pred["predicted_phase"], "planner_device": pred["planner_device"]})
    for t in table:
        print(json.dumps(t))

    def stats(sub, key):
        errs = sorted(abs(t[key]) for t in sub)
        return {"median_abs": round(statistics.median(errs), 3), "worst_abs": round(errs[-1], 3), "n": len(errs)} \
            if errs else {}

    held = [t for t in table if not t["calibrate"]]
    print(json.dumps({"summary": {"memory_all": stats(table, "mem_err"), "memory_held_out": stats(held, "mem_err"),
                                  "time_all": stats(table, "time_err"), "time_held_out": stats(held, "time_err"),
                                  "measured_against": "torch.cuda.max_memory_allocated" if gpu else "peak RSS",
                                  "utilisation": UTILISATION["gpu" if gpu else "cpu"],
                                  "load_average_now": os.getloadavg()}}))


if __name__ == "__main__":
    main()
