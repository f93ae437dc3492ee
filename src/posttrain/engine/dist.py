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


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------- set-up under torchrun


def launched_by_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU). False when not launched so."""
    import os

    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_device(device: torch.device) -> torch.device:
    import os

    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _fits_replicated(model: torch.nn.Module, device: torch.device) -> bool:
    """DDP keeps weights, gradients and two AdamW moments per rank: ~16 bytes per fp32 parameter."""
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = 4 * n + 12 * trainable
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.6 * free
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need * world_size() < 0.5 * total  # all ranks of a CPU node share its memory


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: FSDP2 shards each as its own unit."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP")


def wrap_model(model: torch.nn.Module, strategy: str, *, precision: str, device: torch.device,
               cpu_offload: bool = False) -> tuple[torch.nn.Module, str]:
    """Wrap for data parallelism. Returns (model, strategy actually used: none|ddp|fsdp)."""
    if not is_distributed() or strategy == "none":
        return model, "none"
    if strategy == "auto":
        strategy = "ddp" if _fits_replicated(model, device) else "fsdp"
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids), "ddp"
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {}
    if precision == "bf16":
        # bf16 compute and communication of parameters, fp32 gradient reduction
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model, "fsdp"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Collective under FSDP: the full, unsharded state dict on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
