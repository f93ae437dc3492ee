"""SFT throughput from 1 to 2 processes on this machine's CPU (torchrun, gloo): tokens/s and peak RSS.

    python bench/scaling.py              # 1 process, DDP x 2, FSDP2 x 2; each twice, interleaved
    python bench/scaling.py --quick      # fewer steps, one repeat (a smoke run)

The global batch is the same in every configuration (8 packed rows of 256 tokens per optimizer
step: 8 rows in one process, 4 per rank with two), so every run does the same arithmetic. Each
rank is one process with one thread (OMP_NUM_THREADS=1): on a 2-core machine 2 ranks can at best
double the throughput, minus the gradient all-reduce (DDP) or the all-gathers and
reduce-scatters (FSDP2) over gloo. The machine may be shared: every configuration runs `--repeats`
times, interleaved with the others, the median is reported, and the 1-minute load average is
recorded before and after each run. Prints JSON.

tokens/s counts every token of the packed rows (padding included; packing leaves little) of all
ranks over the steady steps (the first 3 steps, warm-up, are left out); per-rank tokens/s is the
total divided by the number of ranks.
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

WARMUP_STEPS = 3
GLOBAL_ROWS = 8
ROW_LEN = 256


def make_inputs(work: Path) -> tuple[Path, Path, int]:
    """A ~7M-parameter Qwen2-shaped model and gym instruct chats (packed into 256-token rows)."""
    from posttrain import gym
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    rows = [{"messages": r["messages"]} for r in gym.load_task_rows("instruct", "train", n=2000)]
    tok = build_tokenizer(vocab_size=2048, corpus=[m["content"] for r in rows for m in r["messages"]])
    model = build_tiny_model("qwen2", work / "model", tokenizer=tok, hidden=256, layers=6, heads=4, kv_heads=2,
                             intermediate=768, max_pos=1024)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import torch
    from safetensors.torch import load_file

    n = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
    torch.set_num_threads(1)
    return model, data, n


def child(a) -> None:
    """One rank (or the single process): train, then write its own peak RSS next to the run."""
    from posttrain.stages import load_config
    from posttrain.stages import sft

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config("sft", overrides=[
        f"model={a.model}", f"data.train={a.data}", f"output_dir={a.out}", f"train.batch_size={GLOBAL_ROWS // world}",
        f"data.max_length={ROW_LEN}", "data.packing=true", "train.lr=1e-4", "train.warmup_steps=0",
        f"train.max_steps={a.steps}", "train.progress=false", "train.precision=fp32", "train.eval_every=null",
        f"train.distributed={a.strategy}"])
    sft.run(cfg)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(a.out) / f"rss-rank{rank}.json").write_text(json.dumps({"peak_rss_mb": rss}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(model: Path, data: Path, out: Path, nproc: int, strategy: str, steps: int) -> dict:
    args = [__file__, "--child", f"--model={model}", f"--data={data}", f"--out={out}", f"--steps={steps}",
            f"--strategy={strategy}"]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{nproc} x {strategy} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["split"] == "train"][WARMUP_STEPS:]
    step_s = statistics.median(r["step_time_s"] for r in steady)
    tokens_per_step = GLOBAL_ROWS * ROW_LEN
    rss = [json.loads((out / f"rss-rank{r}.json").read_text())["peak_rss_mb"] for r in range(nproc)]
    return {"tokens_per_s": tokens_per_step / step_s, "tokens_per_s_per_rank": tokens_per_step / step_s / nproc,
            "median_step_s": step_s, "peak_rss_mb_per_rank": [round(x, 1) for x in rss],
            "wall_s": round(time.time() - t0, 1), "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--strategy", default="none")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.child:
        child(a)
        return
    if a.quick:
        a.steps, a.repeats = 6, 1
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model, data, n_params = make_inputs(work)
    configs = [("1 process", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP2", 2, "fsdp")]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for rep in range(a.repeats):  # interleaved, so a burst of load from others hits every configuration
        for name, nproc, strategy in configs:
            runs[name].append(run_one(model, data, work / f"{name.replace(' ', '-')}-{rep}", nproc, strategy, a.steps))
    out = {"machine": {"cpus": os.cpu_count(), "threads_per_rank": 1}, "params": n_params,
           "global_batch": f"{GLOBAL_ROWS} packed rows x {ROW_LEN} tokens", "steps": a.steps,
           "warmup_steps_excluded": WARMUP_STEPS, "repeats": a.repeats, "configs": {}}
    base = statistics.median(r["tokens_per_s"] for r in runs["1 process"])
    for name, _, _ in configs:
        rs = runs[name]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        out["configs"][name] = {
            "tokens_per_s": round(tps, 1),
            "tokens_per_s_per_rank": round(statistics.median(r["tokens_per_s_per_rank"] for r in rs), 1),
            "speedup_vs_1_process": round(tps / base, 3),
            "peak_rss_mb_per_rank": [round(statistics.median(x), 1) for x in zip(*(r["peak_rss_mb_per_rank"] for r in rs))],
            "runs": rs}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
