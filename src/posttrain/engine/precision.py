"""The one autocast helper: bf16 runs keep fp32 master weights and compute matmuls in bf16.

`train.precision: auto` is bf16 where the device has bf16 matrix kernels and fp32 elsewhere
(`resolve_precision`; the test is `posttrain.models.hardware.native_bf16`: on an AVX2-only CPU bf16
matmuls ran 80x slower than fp32, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib

import torch

from posttrain.models.hardware import native_bf16, warn_slow_bf16

__all__ = ["autocast", "native_bf16", "resolve_precision"]


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """A fresh context for one forward: bf16 autocast on `device` when `precision` is "bf16", else nothing.

    `device` is a torch.device, a device string, or a module (its parameters' device).
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    if isinstance(device, torch.nn.Module):
        device = next(device.parameters()).device
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def resolve_precision(precision: str, device) -> str:
    """`auto` -> "bf16" where `native_bf16(device)`, else "fp32"; "fp32"/"bf16" are kept as asked.

    An explicit bf16 on a device without bf16 kernels runs, with a warning that says how slow it is.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warn_slow_bf16(str(torch.device(device)), "train.precision=bf16",
                       "train.precision=auto picks fp32 here and bf16 where the hardware has it.")
    return precision
