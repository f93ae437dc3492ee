"""Rank-aware helpers. Without torch.distributed initialised, everything is rank 0 of 1.

Everything that writes (logs, reports, checkpoints of rank-0 state) asks `is_main()`,
and every count that normalizes a loss goes through `all_reduce_sum`, so running under
torchrun needs no rewrite of the engine.
"""

from __future__ import annotations

import contextlib

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


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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


def replicated_bytes(n_params: int, n_trainable: int) -> int:
    """What DDP holds per rank: fp32 weights (4 B each) plus, per trainable parameter, a gradient
    and two AdamW moments (12 B more)."""
    return 4 * n_params + 12 * n_trainable


def choose_strategy(n_params: int, n_trainable: int, *, free_bytes: int, ranks_sharing: int = 1,
                    budget: float = 0.6) -> str:
    """`train.distributed=auto`: "ddp" when `ranks_sharing` replicas fit in `budget` of `free_bytes`
    (one GPU's free memory, or a CPU node's RAM shared by all its ranks), else "fsdp"."""
    return "ddp" if replicated_bytes(n_params, n_trainable) * ranks_sharing < budget * free_bytes else "fsdp"


def _auto_strategy(model: torch.nn.Module, device: torch.device) -> str:
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return choose_strategy(n, trainable, free_bytes=free)
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return choose_strategy(n, trainable, free_bytes=total, ranks_sharing=world_size(), budget=0.5)


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
        strategy = _auto_strategy(model, device)
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
        # pinned host memory speeds up the copies to a GPU; pinning needs one, so CPU-only runs skip it
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    _check_nf4_shardable(model, world_size())
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model, "fsdp"


def _check_nf4_shardable(model: torch.nn.Module, ranks: int) -> None:
    """QLoRA under FSDP2: torchao's NF4Tensor shards along dim 0 only when each of its packed parts
    (4-bit codes, block scales, scale factors) divides evenly by the number of ranks; say which
    layer does not, instead of torchao's bare assertion mid-sharding."""
    for name, p in model.named_parameters():
        if type(p).__name__ != "NF4Tensor" and type(getattr(p, "data", None)).__name__ != "NF4Tensor":
            continue
        t = p if type(p).__name__ == "NF4Tensor" else p.data
        parts = {a: getattr(t, a).numel() for a in ("quantized_scalers", "quantization_factor", "quantized_data")}
        bad = {a: n for a, n in parts.items() if n % ranks} or ({"rows": t.size(0)} if t.size(0) % ranks else {})
        if bad:
            a, n = next(iter(bad.items()))
            raise ValueError(f"QLoRA under FSDP2: {name} cannot be split over {ranks} ranks ({a} has {n} "
                             f"elements); use train.distributed=ddp (the NF4 base is small to replicate) or "
                             f"a number of processes that divides it")


@contextlib.contextmanager
def rollout_view(model: torch.nn.Module):
    """The model to sample from inside the block, with no collective per forward pass.

    Ranks generate their own prompts and stop after different numbers of tokens, so a forward
    pass may not be a collective: under DDP the block yields the plain module (its replica is
    complete), and under FSDP2 it all-gathers every unit once on entry, keeps the parameters
    unsharded for the whole rollout (generation, reference and value passes) and reshards on exit.
    The cost is one full copy of the weights per rank while the rollout runs.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if is_distributed() else []
    if not units:
        yield unwrap(model)
        return
    inner = [m for m in units if m is not model]  # the root already stays unsharded after its forward
    for m in units:
        m.unshard()
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)
        for m in units:
            m.reshard()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Collective under FSDP: the full, unsharded state dict on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
