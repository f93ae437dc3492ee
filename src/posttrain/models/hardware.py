"""Whether a device computes bf16 matmuls at bf16 speed, and the one warning when it does not.

On a CPU, bf16 is fast only where oneDNN has a bf16 kernel (AVX512 or AMX); on an AVX2-only CPU
PyTorch falls back to a scalar loop: measured on a 2-core AMD EPYC (AVX2, torch 2.13, 1024^3)
0.96 GFLOP/s in bf16 against 78 GFLOP/s in fp32 (bench/cpu_precision.py, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_kernels() -> bool:
    try:  # oneDNN's own test: AVX512 (BW, VL, DQ) or AVX512-BF16 or AMX
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: PyTorch's scalar bf16 path
        return False


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 matmuls at bf16 speed (not an emulation slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_has_bf16_kernels()
    return False  # mps, xpu and the rest: fp32 unless asked for


@functools.lru_cache(maxsize=None)
def warn_slow_bf16(device: str, what: str, instead: str) -> None:
    """Once per process and setting: `what` asks for bf16 on `device`, which has no bf16 matrix kernels."""
    cap = torch.backends.cpu.get_cpu_capability() if device == "cpu" else device
    log.warning("%s on %s (%s), which has no bf16 matrix kernels: bf16 matmuls run in a slow fallback "
                "(measured 80x slower than fp32 on an AVX2 CPU). %s", what, device, cap, instead)
