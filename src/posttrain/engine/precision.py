"""The one autocast helper: bf16 runs keep fp32 master weights and compute matmuls in bf16.

`train.precision: auto` is bf16 where the device has bf16 matrix kernels and fp32 elsewhere
(`resolve_precision`). On a CPU, bf16 is fast only where oneDNN has a bf16 kernel (AVX512 or AMX);
on an AVX2-only CPU PyTorch falls back to a scalar loop: measured on a 2-core AMD EPYC (AVX2,
torch 2.13, one thread, 1024^3) 1.0 GFLOP/s in bf16 against 75 GFLOP/s in fp32 (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """A fresh context for one forward: bf16 autocast on `device` when `precision` is "bf16", else nothing.

    `device` is a torch.device, a device string, or a module (its parameters' device).
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    if isinstance(device, torch.nn.Module):
        device = next(device.parameters()).device
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


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


def resolve_precision(precision: str, device) -> str:
    """`auto` -> "bf16" where `native_bf16(device)`, else "fp32"; "fp32"/"bf16" are kept as asked.

    An explicit bf16 on a device without bf16 kernels runs, with a warning that says how slow it is.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        _warn_slow_bf16(str(torch.device(device)))
    return precision


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16(device: str) -> None:
    cap = torch.backends.cpu.get_cpu_capability() if device == "cpu" else device
    log.warning("train.precision=bf16 on %s (%s), which has no bf16 matrix kernels: bf16 matmuls run in a slow "
                "fallback (measured 75x slower than fp32 on an AVX2 CPU). train.precision=auto picks fp32 here "
                "and bf16 where the hardware has it.", device, cap)
