"""AdamW and learning-rate schedules (linear warmup, then constant, linear or cosine decay).

The schedule's length is the run's own steps unless `train.schedule_steps` sets a longer one: then the
run is the first steps of that schedule, and stops before the decay ends (a pilot of the adviser is
the first minutes of the full run, learning rate included; docs/advise.md, "Pilots").
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from posttrain.config import ConfigError


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas, eps: float):
    """AdamW over trainable parameters only. Biases and norm weights (1-D) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at step s (0-based): linear warmup over `warmup` steps, then decay."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule '{schedule}'")

    return f


def schedule_length(schedule_steps: Optional[int], run_steps: int) -> int:
    """The schedule's length in optimizer steps: `train.schedule_steps`, else the run's own steps.
    A schedule shorter than the run would train its last steps at the decayed end: refused."""
    if schedule_steps is None:
        return run_steps
    if schedule_steps < run_steps:
        raise ConfigError(f"train.schedule_steps={schedule_steps} is shorter than the run ({run_steps} optimizer "
                          f"steps): set it to at least {run_steps}, or leave it unset for the run's own length")
    return schedule_steps


def build_scheduler(optimizer, *, schedule: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup, total))
