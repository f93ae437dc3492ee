"""Matmul rate in fp32 and in bf16 on this CPU, and what `train.precision: auto` picks here.

    python bench/cpu_precision.py [--size 1024] [--threads 1] [--repeats 5]

Prints one JSON object: GFLOP/s per dtype (median of `--repeats` timed products after a warm-up),
their ratio, the CPU capability PyTorch dispatches to, oneDNN's bf16 check and `auto`'s choice.
On a CPU without bf16 kernels (AVX2) the bf16 product is a scalar fallback, tens of times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from posttrain.engine.precision import native_bf16, resolve_precision


def rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp32, bf16 = rate(torch.float32, a.size, a.repeats), rate(torch.bfloat16, a.size, a.repeats)
    print(json.dumps({"size": a.size, "threads": a.threads, "fp32_gflops": round(fp32, 1),
                      "bf16_gflops": round(bf16, 2), "bf16_over_fp32": round(bf16 / fp32, 3),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16("cpu"),
                      "auto_picks": resolve_precision("auto", "cpu"), "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
