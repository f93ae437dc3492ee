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
Training then holds the NF4 codes only. The matmul (`NF4Matmul`) dequantizes the weight a chunk of
rows at a time, in forward and again in backward, so no more than one chunk is ever dequantized:
torchao's `linear_nf4` dequantizes the whole weight at once, with about 16 bytes of temporaries per
weight (int64 codes, bf16 levels and scales, the cast to the input's dtype), which on a 4608 x 256
MLP weight is 18 MiB against our 4.7 MiB (bench/nf4_matmul.py). The dequantized values are bit for
bit torchao's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import mmap
import threading
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


# Weights torchao's quantizer assigns to their nearest NF4 level at once. Its default (2^20) compares each
# weight with the 16 levels in one [2^20, 16] bf16 tensor, 32 MiB, twice (a 4M-weight linear: 83 MiB of
# peak against 24 with 2^14; scenario (d)'s 9,216-wide model loads at 210-212 MiB instead of 248-252);
# freed, such a block also raises glibc's dynamic mmap threshold to its 32 MiB maximum, after which every
# tensor of the run is served from glibc's heap. The codes do not depend on the chunk.
QUANTIZE_CHUNK = 1 << 14


@contextlib.contextmanager
def _small_quantizer_chunks():
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor  # optional dependency, see _nf4

    old = getattr(nf4_tensor, "CHUNK_SIZE", None)
    nf4_tensor.CHUNK_SIZE = QUANTIZE_CHUNK
    try:
        yield
    finally:
        if old is None:
            del nf4_tensor.CHUNK_SIZE
        else:
            nf4_tensor.CHUNK_SIZE = old


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
        with _small_quantizer_chunks():
            self.weight = nn.Parameter(to_nf4(w, BLOCK, _scaler_block(w.numel() // BLOCK)), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.get_original_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = NF4Matmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


# weights dequantized at once: on the CPU a 2.5 MiB workspace (10 bytes per weight); on a GPU large enough
# that each chunk's matmul still runs at full speed (a 4096-wide weight in chunks of 1024 rows)
CHUNK_WEIGHTS = {"cpu": 1 << 18, "cuda": 1 << 22}


class _Workspace:
    """The buffers a chunk is dequantized into, one set per device and dtype, reused by every NF4 matmul.

    Allocating the chunk's temporaries afresh for every chunk of every matmul leaves glibc's heap
    fragmented on the CPU (measured: the peak RSS of a QLoRA run rose 30-100 MiB against torchao's
    whole-weight dequantization, whose large blocks are mmapped and returned); one reused set makes
    the dequantization allocate nothing after the first step. The buffers are shared, so a matmul holds
    `lock` while it uses them: two threads running NF4 matmuls at once (a server beside a training) take
    turns instead of overwriting each other's chunk.
    """

    def __init__(self):
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self.lock = threading.RLock()

    def get(self, device: torch.device, dtype: torch.dtype, weights: int) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        got = self.buffers.get(key)
        if got is None or got["scaled"].numel() < weights:
            got = {"codes": torch.empty(weights // 2, dtype=torch.int32, device=device),
                   "values": torch.empty(weights, dtype=torch.bfloat16, device=device),
                   "scaled": torch.empty(weights, dtype=torch.bfloat16, device=device)}
            got["cast"] = got["scaled"] if dtype == torch.bfloat16 else torch.empty(weights, dtype=dtype, device=device)
            self.buffers[key] = got
        return got


WORKSPACE = _Workspace()


def dequantized_rows(w, scalers: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows r0..r1 of an NF4 weight, dequantized exactly as torchao's `get_original_weight` does, into
    the shared workspace (valid until the next call on this device and dtype: use it at once).

    Element i of the flattened weight is `nf4[code_i] * scale[i // 64]` in the weight's dtype (bf16),
    where code_i is the high nibble of byte i/2 for even i and the low nibble for odd i, and
    `scalers` holds the per-block scales (`NF4Tensor.dequantize_scalers`). One gather from a table
    of the 256 byte values' level pairs decodes both nibbles at once (3x faster than torchao's two
    int64 gathers on this CPU). `r0 * in_features` and `r1 * in_features` must be multiples of the
    block size.
    """
    cols = w.shape[1]
    lo, hi = r0 * cols, r1 * cols
    n = hi - lo
    ws = WORKSPACE.get(w.quantized_data.device, dtype, n)
    byte = torch.arange(256, device=w.nf4.device)
    pairs = torch.stack([w.nf4[byte >> 4], w.nf4[byte & 0b1111]], dim=-1)  # [256, 2]
    codes = ws["codes"][: n // 2]
    codes.copy_(w.quantized_data[lo // 2: hi // 2])
    values = ws["values"][:n].view(n // 2, 2)
    torch.index_select(pairs, 0, codes, out=values)
    scaled = ws["scaled"][:n].view(-1, w.block_size)
    torch.mul(values.view(-1, w.block_size), scalers[lo // w.block_size: hi // w.block_size].unsqueeze(-1), out=scaled)
    cast = ws["cast"][:n]
    if cast.data_ptr() != scaled.data_ptr():
        cast.copy_(scaled.view(-1))
    return cast.view(r1 - r0, cols)


def _row_chunks(w) -> list[tuple[int, int]]:
    rows, cols = w.shape
    step = math.lcm(cols, w.block_size) // cols  # chunks hold whole blocks
    per = max(step, CHUNK_WEIGHTS.get(w.device.type, CHUNK_WEIGHTS["cuda"]) // cols // step * step)
    return [(r, min(r + per, rows)) for r in range(0, rows, per)]


class NF4Matmul(torch.autograd.Function):
    """y = x W^T for a frozen NF4 weight W [out, in], dequantized a chunk of rows at a time.

    Forward writes y[:, r0:r1] = x W[r0:r1]^T for each chunk; backward accumulates
    dL/dx = sum over chunks of dL/dy[:, r0:r1] W[r0:r1]. Only the NF4 weight is saved (W is frozen,
    so there is no dL/dW). Under autocast the matmul runs in the autocast dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(w)
        with torch.autocast(x.device.type, enabled=False), WORKSPACE.lock:
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            y = torch.empty(flat.shape[0], w.shape[0], dtype=dtype, device=x.device)
            scalers = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
            for r0, r1 in _row_chunks(w):
                torch.mm(flat, dequantized_rows(w, scalers, r0, r1, dtype).T, out=y[:, r0:r1])
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (w,) = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = torch.zeros(g.shape[0], w.shape[1], dtype=g.dtype, device=g.device)
        scalers = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
        with WORKSPACE.lock:
            for r0, r1 in _row_chunks(w):
                grad_x.addmm_(g[:, r0:r1], dequantized_rows(w, scalers, r0, r1, g.dtype))
        return grad_x.view(*grad_y.shape[:-1], w.shape[1]), None


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
