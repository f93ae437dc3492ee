"""QLoRA's frozen base: linear weights stored as NF4 (Dettmers et al. 2023, "QLoRA").

NF4 holds each weight as one of 16 levels spaced as quantiles of a normal
distribution, scaled by the absmax of its block of 64. The per-block scales are
themselves quantized to 8 bits (double quantization, blocks of 256), which brings
the cost to about 4.1 bits per weight. torchao's `NF4Tensor` does this and runs on
CPU and GPU; the matmul dequantizes to the input's dtype on the fly, so the
LoRA weights on top stay in fp32 (or bf16) and train normally.

On the CPU the base's fp32 weights are pages of the memory-mapped safetensors file. Quantizing reads
them, and pages once read stay resident; so `quantize_linears` works one layer at a time and, after
each, gives back what it no longer needs: the file pages of the weight it replaced (`release_pages`)
and the heap that the quantizer's freed temporaries leave in glibc's allocator (`return_freed_heap`).
Training then holds the NF4 codes only: torchao's `linear_nf4` saves the NF4 weight for backward and
dequantizes it again there, so no dequantized weight outlives its matmul.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import warnings
from typing import Optional

import torch
from torch import nn
from posttrain.models.adapters.lora import LoraWeights, linear_names

BLOCK = 64
SCALER_BLOCK = 256


def _nf4():
    try:
        from torchao.quantization import NF4Tensor, to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError as e:  # torchao is an optional dependency
        raise ImportError("adapter.type=qlora needs torchao>=0.18: pip install 'posttrain[qlora]'") from e
    return NF4Tensor, to_nf4, linear_nf4


def _scaler_block(n_blocks: int) -> int:
    # torchao needs the number of scales to divide evenly; small layers use a smaller scale block
    if n_blocks % SCALER_BLOCK == 0:
        return SCALER_BLOCK
    return max(d for d in range(1, min(SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is an NF4Tensor."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        _, to_nf4, _ = _nf4()
        w = linear.weight.detach().to(torch.bfloat16)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_nf4(w, BLOCK, _scaler_block(w.numel() // BLOCK)), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.get_original_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, linear_nf4 = _nf4()
        out = linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_linears(model, paths: Optional[list[str]] = None) -> list[str]:
    """Replace the model's linear layers (all but the output head, or `paths`) with NF4Linear, in place.

    One layer at a time: after each, the file pages of the fp32 weight it replaced are released and
    the quantizer's freed heap is returned to the OS, so the host's peak is the NF4 model plus one
    layer's temporaries, not the fp32 model. Returns the quantized paths. A weight whose size is not
    a multiple of 64 stays as it is.
    """
    paths = linear_names(model) if paths is None else paths
    done, skipped = [], []
    maps = _file_mappings()
    for path in paths:
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            continue
        if mod.weight.numel() % BLOCK:
            skipped.append(path)
            continue
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(mod))
        release_pages(mod.weight, maps)
        del mod
        return_freed_heap()
        done.append(path)
    if skipped:
        warnings.warn(f"QLoRA: {len(skipped)} linear layers kept in full precision (size not a multiple of "
                      f"{BLOCK}), e.g. {skipped[0]}", stacklevel=2)
    return done


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds; for NF4 the sum of its packed codes and quantized scales."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None:
        names, _ = inner()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def linear_weight_bytes(model) -> dict[str, int]:
    """Bytes of the base linear weights (head and adapters excluded) as stored, and in bf16."""
    adapter_parts = {id(x) for m in model.modules() if isinstance(m, LoraWeights) for x in m.modules()}
    stored = bf16 = 0
    for m in model.modules():
        if (isinstance(m, (nn.Linear, NF4Linear)) and m is not model.get_output_embeddings()
                and id(m) not in adapter_parts):
            stored += tensor_bytes(m.weight)
            bf16 += m.weight.numel() * 2
    return {"stored": stored, "bf16": bf16}


def dequantize_linears(model) -> None:
    """Turn every NF4Linear back into a plain nn.Linear (used before merging)."""
    dtype = model.get_input_embeddings().weight.dtype
    for path, mod in list(model.named_modules()):
        if isinstance(mod, NF4Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype,
                            device=mod.weight.device)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight().to(dtype))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            lin.requires_grad_(False)
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)


# ---------------------------------------------------------------- host memory


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of safetensors files (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors") and parts[1].endswith("p"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def release_pages(t: torch.Tensor, maps: Optional[list[tuple[int, int]]] = None) -> int:
    """Drop the resident pages of a CPU tensor that lies in a mapped safetensors file; returns the bytes.

    Only the pages wholly inside the tensor are dropped (MADV_DONTNEED), and only in a private file
    mapping: a later read faults them in again from the file, so nothing else that maps the file
    changes. Call it on a weight the model no longer uses (quantize_linears, after replacing it).
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        return 0
    start, size = t.data_ptr(), t.numel() * t.element_size()
    maps = _file_mappings() if maps is None else maps
    if not any(lo <= start and start + size <= hi for lo, hi in maps):
        return 0
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + size) // page * page
    libc = _libc()
    if hi <= lo or libc is None:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return hi - lo if libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0 else 0


def return_freed_heap() -> bool:
    """glibc keeps freed heap memory for reuse; malloc_trim(0) returns it to the OS. False without glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0)) or True


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
