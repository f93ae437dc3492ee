"""Helpers of the torchrun tests: run a stage in one process or under torchrun with 2 CPU ranks (gloo),
and read back what the run wrote."""

import json
import os
import socket
import subprocess
import sys

from safetensors.torch import load_file


def env():
    # one thread per rank: two ranks share two cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(args, stage="sft"):
    r = subprocess.run([sys.executable, "-m", "posttrain", stage, *args], env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun(args, stage="sft", nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "posttrain", stage, *args]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def records(run, split="train"):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == split]


def losses(run):
    return [r["loss"] for r in records(run)]


def weights(run, sub="model"):
    f = run / sub / ("adapter_model.safetensors" if sub == "adapter" else "model.safetensors")
    return load_file(str(f))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def max_rel_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))
