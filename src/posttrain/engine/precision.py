"""The one autocast helper: bf16 runs keep fp32 master weights and compute matmuls in bf16."""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """A fresh context for one forward: bf16 autocast on `device` when `precision` is "bf16", else nothing.

    `device` is a torch.device, a device string, or a module (its parameters' device).
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    if isinstance(device, torch.nn.Module):
        device = next(device.parameters()).device
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
