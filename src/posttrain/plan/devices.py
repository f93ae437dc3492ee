"""Devices the planner knows: memory, peak matmul throughput and memory bandwidth, with sources.

GPU figures are the vendors' published dense (no sparsity) peaks. `fp32` is the plain FP32
rate (posttrain's `precision: fp32` runs its matmuls in fp32; TF32 is off in PyTorch by default);
`bf16` is the tensor-core rate with fp32 accumulation. The CPU entry is measured on this project's
2-core machines (torch 2.13, one OpenMP thread, 1024^3 matmuls and a 256 MiB copy) and scales
with the number of threads the run uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GB = 10**9
GiB = 2**30
TFLOPS = 10**12


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bf16_flops: float  # peak dense FLOP/s
    fp32_flops: float
    bandwidth: float  # bytes/s
    source: str
    kind: str = "gpu"

    def peak_flops(self, precision: str) -> float:
        return self.bf16_flops if precision == "bf16" else self.fp32_flops


DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("H100-80GB", 80 * GB, 989 * TFLOPS, 67 * TFLOPS, 3.35e12,
           "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity (989 dense), "
           "FP32 67 TFLOPS, HBM3 3.35 TB/s"),
    Device("H200", 141 * GB, 989 * TFLOPS, 67 * TFLOPS, 4.8e12,
           "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s, BF16 1,979 TFLOPS with "
           "sparsity (989 dense), FP32 67 TFLOPS"),
    Device("A100-40GB", 40 * GB, 312 * TFLOPS, 19.5 * TFLOPS, 1.555e12,
           "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): BF16 312 TFLOPS, FP32 19.5 TFLOPS, "
           "HBM2 1,555 GB/s"),
    Device("A100-80GB", 80 * GB, 312 * TFLOPS, 19.5 * TFLOPS, 2.039e12,
           "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS, FP32 19.5 TFLOPS, "
           "HBM2e 2,039 GB/s"),
    Device("L4-24GB", 24 * GB, 121 * TFLOPS, 30.3 * TFLOPS, 300e9,
           "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity (121 dense), FP32 30.3 TFLOPS, "
           "300 GB/s"),
    Device("RTX4090-24GB", 24 * GB, 165.2 * TFLOPS, 82.6 * TFLOPS, 1.008e12,
           "NVIDIA Ada Lovelace GPU architecture whitepaper v1, GeForce RTX 4090: FP16/BF16 tensor with FP32 "
           "accumulate 165.2 TFLOPS dense, FP32 82.6 TFLOPS, GDDR6X 1,008 GB/s"),
    Device("L40S-48GB", 48 * GB, 362 * TFLOPS, 91.6 * TFLOPS, 864e9,
           "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity (362 dense), FP32 91.6 TFLOPS, 864 GB/s"),
    Device("A6000-48GB", 48 * GB, 154.8 * TFLOPS, 38.7 * TFLOPS, 768e9,
           "NVIDIA RTX A6000 datasheet: tensor 309.7 TFLOPS with sparsity (154.8 dense), FP32 38.7 TFLOPS, "
           "768 GB/s (the class of 48 GB GPU of the QLoRA paper)"),
]}

# measured on this project's CPU machines, per OpenMP thread (see module docstring and docs/advise.md);
# bf16 209 on a CPU with oneDNN's bf16 kernels (AVX512/AMX), 1.0 on an AVX2-only AMD EPYC (2026-12-07)
CPU_PER_THREAD = dict(fp32_flops=75e9, bf16_flops=209e9, bandwidth=25.7e9)
CPU_BF16_FALLBACK_FLOPS = 1.0e9


def cpu_device(threads: int | None = None, memory_bytes: int | None = None) -> Device:
    """This machine's CPU: the measured per-thread peaks times the threads a run uses."""
    if threads is None:
        import torch  # deferred: the GPU table needs no torch

        threads = torch.get_num_threads()
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from posttrain.models.hardware import native_bf16  # deferred, as torch above

    bf16 = CPU_PER_THREAD["bf16_flops"] if native_bf16("cpu") else CPU_BF16_FALLBACK_FLOPS
    return Device(f"cpu", memory_bytes, bf16 * threads, CPU_PER_THREAD["fp32_flops"] * threads,
                  CPU_PER_THREAD["bandwidth"],
                  f"measured here: {threads} thread(s) x (fp32 75, bf16 {bf16 / 1e9:g} GFLOP/s at 1024^3; "
                  "copy 25.7 GB/s)", kind="cpu")


def get_device(name: str) -> Device:
    if name.lower() == "cpu":
        return cpu_device()
    for key, dev in DEVICES.items():
        if key.lower() == name.lower() or key.split("-")[0].lower() == name.lower():
            return dev
    raise KeyError(f"unknown device '{name}'; known: cpu, {', '.join(DEVICES)}")
