"""Rank-aware helpers. Without torch.distributed initialised, everything is rank 0 of 1.

Everything that writes (logs, reports, checkpoints of rank-0 state) asks `is_main()`,
and every count that normalizes a loss goes through `all_reduce_sum`, so running under
torchrun needs no rewrite of the engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()
