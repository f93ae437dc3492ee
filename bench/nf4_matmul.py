"""QLoRA's NF4 matmul: posttrain's chunked dequantization (`NF4Matmul`) against torchao's `linear_nf4`.

    OMP_NUM_THREADS=1 python bench/nf4_matmul.py [--shapes 4608x256,256x4608,16384x256] [--tokens 128] [--runs 5]

For each weight shape [out, in] and each side, a child process (one OpenMP thread) builds an NF4
weight from a random bf16 one and runs forward and backward of y = x W^T on `--tokens` rows: it prints
the temporaries (peak RSS during one forward and backward minus the RSS before it, with glibc's mmap
threshold fixed at 64 KiB so that every freed block leaves the RSS at once and the peak counts what
was alive together, plus posttrain's dequantization workspace, which stays allocated between matmuls)
and, in a second child with glibc's defaults, the median wall time of a forward and backward over
`--runs` repetitions; the sides alternated. Prints one JSON object per shape, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":"))


def child(side: str, out_f: int, in_f: int, tokens: int, runs: int) -> dict:
    import time

    import torch

    from posttrain.models.adapters.qlora import NF4Linear

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin = NF4Linear(torch.nn.Linear(in_f, out_f, bias=False))
    x = torch.randn(tokens, in_f, requires_grad=True)
    g = torch.randn(tokens, out_f)
    if side == "torchao":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        def fn():
            return linear_nf4(x, lin.weight)
    else:
        def fn():
            return lin(x)
    fn().backward(g)  # warm up: lazy initialisation, the first matmul's buffers
    x.grad = None
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn().backward(g)
        times.append(time.perf_counter() - t)
        x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    fn().backward(g)
    from posttrain.models.adapters.qlora import WORKSPACE

    held = {id(t): t for b in WORKSPACE.buffers.values() for t in b.values()}.values()
    workspace = sum(t.numel() * t.element_size() for t in held) / 2**20
    return {"side": side, "shape": [out_f, in_f], "tokens": tokens, "workspace_mib": round(workspace, 2),
            "temporaries_mib": round((_kib("VmHWM") - before) / 1024 + workspace, 2),
            "weight_fp32_mib": round(out_f * in_f * 4 / 2**20, 2),
            "fwd_bwd_ms": round(1000 * statistics.median(times), 2)}


def _run(args: list, env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(p.stderr[-2000:])
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4608x256,256x4608,16384x256,2048x2048")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="child processes per side, alternated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(*json.loads(a.child))), flush=True)
        return
    default_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    default_env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env = {**default_env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    summary = []
    for shape in a.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        got: dict[str, list[dict]] = {"torchao": [], "posttrain": []}
        for _ in range(a.rounds):
            for side in ("torchao", "posttrain"):
                # memory with every freed block leaving the RSS; time with glibc as a user runs it
                mem, timed = (_run([side, out_f, in_f, a.tokens, a.runs], e) for e in (env, default_env))
                got[side].append({"temporaries_mib": mem["temporaries_mib"], "fwd_bwd_ms": timed["fwd_bwd_ms"]})
        row = {"shape": shape, "tokens": a.tokens}
        for side, rs in got.items():
            row[side] = {"temporaries_mib": statistics.median(r["temporaries_mib"] for r in rs),
                         "fwd_bwd_ms": statistics.median(r["fwd_bwd_ms"] for r in rs)}
        row["memory_ratio"] = round(row["posttrain"]["temporaries_mib"] / row["torchao"]["temporaries_mib"], 3)
        row["speedup"] = round(row["torchao"]["fwd_bwd_ms"] / row["posttrain"]["fwd_bwd_ms"], 3)
        print(json.dumps(row), flush=True)
        summary.append(row)
    print(json.dumps({"load_average": os.getloadavg(), "rows": len(summary)}))


if __name__ == "__main__":
    main()
