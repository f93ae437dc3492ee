"""Peak training memory of a posttrain run, term by term, from the model's shape and the run's settings.

Every term models what posttrain itself does (read, not guessed):

- weights: fp32 master weights always (`engine.setup.load_for_training`; bf16 runs use autocast);
  QLoRA stores the decoder's linear weights as NF4: 4-bit codes, an 8-bit scale per block of 64 and
  an fp32 factor per 256 scales (`models.adapters.qlora`), 0.516 bytes per weight;
- adapter: LoRA A [r, in] and B [out, r] per target linear (`all-linear`: the seven of each layer),
  DoRA adds a magnitude [out]; prompt tuning n·d, prefix tuning n·L·2·kv_heads·head_dim, all fp32;
- gradients: fp32, trainable parameters only; optimizer: AdamW's two fp32 moments (`engine.optim`);
  the step's temporaries: PyTorch's per-tensor AdamW on CPU (two copies of the largest trainable
  tensor), the multi-tensor one on GPU (one copy of every trainable tensor);
- activations: the tensors autograd saves, per token and layer (see `saved_per_token`), or only
  each layer's input under gradient checkpointing (plus one layer recomputed during backward);
- backward through a layer: a gradient for each tensor that layer saved, alive beside them;
- NF4 dequantization (QLoRA): each NF4 linear is dequantized for its matmul, in forward and again
  in backward, a chunk of rows at a time (`models.adapters.qlora.NF4Matmul`: about 2^18 weights on
  the CPU, 2^22 on a GPU) into one workspace that every matmul reuses: 10 bytes per weight of the
  largest chunk (int32 codes, bf16 levels, bf16 scaled values, the fp32 cast), held from the first step;
- logits: the output head runs only at loss positions, a chunk of rows at a time (`models.head`,
  `losses.chunked`): the hidden states at those positions plus a few [chunk, V] buffers;
- autocast copies: bf16 autocast keeps a bf16 copy of each matmul weight for backward;
- reference model: a second fp32 copy for `reference: copy` (a disabled adapter costs nothing);
- KV cache of the rollouts (PPO/GRPO); FSDP2 shards weights, gradients and moments over N ranks and
  gathers one decoder layer (or the root: embeddings and head) at a time;
- runtime: a constant (CUDA context on GPU; allocator and kernel workspace on CPU, calibrated by
  `bench/plan_accuracy.py`).

Training peak = weights + adapter + optimizer + reference + KV cache + runtime + the largest of
(1) end of forward: activations + logits (+ gradients when accumulating), (2) backward through the
head: the same plus the head's gradient, (3) backward through the last layer: activations + the
head's saved states + that layer's gradients, (4) end of backward and the
optimizer step: gradients + step temporaries. On the CPU glibc keeps what the step frees in its heap
(freed blocks under its mmap threshold, which rises to the largest block freed, up to 32 MiB), so
the runtime term grows with the step's transient tensors. Loading peaks separately: posttrain loads
fp32 weights onto the device, except for QLoRA, which quantizes on the CPU layer by layer and then
moves the NF4 model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from posttrain.plan.shapes import ModelShape

FP32 = 4
BF16 = 2
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes + int8 block scales + fp32 factor per 256 scales
# NF4 dequantization (`models.adapters.qlora.NF4Matmul`): its workspace per weight of the largest chunk: int32
# codes (one per two weights: 2 bytes), bf16 levels (2), bf16 scaled values (2), the cast to fp32 (4)
NF4_DEQUANT_BYTES_PER_WEIGHT = 10
NF4_BLOCK = 64
NF4_CHUNK_WEIGHTS = {"cpu": 2**18, "gpu": 2**22}  # models.adapters.qlora.CHUNK_WEIGHTS (cpu, cuda)
ADAPTERS = ("none", "lora", "dora", "qlora", "prompt", "prefix")
CUDA_CONTEXT = 512 * 2**20  # not in max_memory_allocated, but in nvidia-smi; order of magnitude for H100/A100
# CPU: a + b x (the step's transient tensors, `cpu_transient_bytes`), fitted by bench/plan_accuracy.py on
# its six calibration runs (2026-12-06, the QLoRA rows re-measured after its loading fix): what loading
# leaves behind (imports included: transformers' Qwen2 model code alone is 134 MiB of RSS) and the heap
# that freed temporaries leave resident in glibc's allocator (on scenario (d)'s model 50-60 MiB; fixing
# glibc's mmap threshold removes it but makes each step 40-60% slower, so posttrain leaves glibc as it is)
CPU_RUNTIME = 221 * 2**20
CPU_RETAINED_FRACTION = 0.46


@dataclass(frozen=True)
class RunSpec:
    """What a run does, as far as memory and time go (built from a RunConfig by `planner.spec_from_config`)."""

    adapter: str = "none"
    r: int = 16
    targets: Optional[tuple[str, ...]] = None  # LoRA target linears (q_proj, ...); None: all-linear
    num_virtual_tokens: int = 20
    batch_size: int = 8  # rows per micro-batch, per device
    seq_len: int = 1024  # tokens per row
    loss_fraction: float = 1.0  # share of positions with a loss (the head runs only there)
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    sequences_per_row: int = 1  # 2 for preference pairs (chosen + rejected)
    reference: str = "none"  # none | adapter | copy | precomputed
    rollout_rows: int = 0  # sequences generated at once (PPO/GRPO): KV cache
    rollout_len: int = 0  # prompt + completion tokens of a rollout
    gpus: int = 1
    distributed: str = "none"  # none | ddp | fsdp
    cpu_offload: bool = False
    device_kind: str = "gpu"  # gpu | cpu
    embedding_rows: Optional[int] = None  # CPU: rows of a frozen input embedding the data reads (None: all)
    packed: bool = False  # packed rows (data.packing, always for cpt; data.padding_free): a 4-D attention mask

    @property
    def trains_base(self) -> bool:
        return self.adapter == "none"

    @property
    def rows(self) -> int:
        return self.batch_size * self.sequences_per_row

    @property
    def row_len(self) -> int:
        """Tokens through the model per row: prompt tuning prepends its virtual tokens."""
        return self.seq_len + (self.num_virtual_tokens if self.adapter == "prompt" else 0)

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len

    @property
    def loss_tokens(self) -> int:
        return round(self.rows * (self.seq_len - 1) * self.loss_fraction)


# ---------------------------------------------------------------- parameters


def base_weight_bytes(s: ModelShape, spec: RunSpec) -> float:
    """The base model as stored during training: fp32, or NF4 decoder linears under QLoRA.

    On the CPU the fp32 weights are pages of the memory-mapped safetensors file, and a frozen untied
    input embedding is read only at the rows of the tokens the data uses. Under QLoRA the pages of
    each quantized weight are released once its NF4 copy exists (`models.adapters.qlora`), so the
    decoder's linears count as NF4 alone on the CPU too.
    """
    unread = 0
    if spec.device_kind == "cpu" and spec.embedding_rows is not None and not spec.trains_base and not s.tied:
        # a frozen, untied input embedding is a mapped file: only the rows of tokens the data uses are read
        unread = max(0, s.vocab - spec.embedding_rows) * s.hidden * FP32
    if spec.adapter == "qlora":
        return s.linear_params * NF4_BYTES_PER_WEIGHT + (s.total_params - s.linear_params) * FP32 - unread
    return s.total_params * FP32 - unread


def adapter_params(s: ModelShape, spec: RunSpec) -> int:
    if spec.adapter in ("lora", "qlora", "dora"):
        per_layer = sum(spec.r * (i + o) + (o if spec.adapter == "dora" else 0)
                        for i, o in s.linear_shapes(spec.targets))
        return s.layers * per_layer
    if spec.adapter == "prompt":
        return spec.num_virtual_tokens * s.hidden
    if spec.adapter == "prefix":
        return spec.num_virtual_tokens * s.layers * 2 * s.kv_heads * s.head_dim
    return 0


def trainable_params(s: ModelShape, spec: RunSpec) -> int:
    return s.total_params if spec.trains_base else adapter_params(s, spec)


def largest_trainable_tensor(s: ModelShape, spec: RunSpec) -> int:
    if spec.trains_base:
        return max(s.embedding_params, max(i * o for i, o in s.linear_shapes()))
    if spec.adapter in ("lora", "qlora", "dora"):
        return max(spec.r * max(i, o) for i, o in s.linear_shapes(spec.targets))
    return adapter_params(s, spec)


def gradient_bytes(s: ModelShape, spec: RunSpec) -> float:
    return trainable_params(s, spec) * FP32


def optimizer_bytes(s: ModelShape, spec: RunSpec) -> float:
    """AdamW: exp_avg and exp_avg_sq, fp32, per trainable parameter."""
    return 2 * trainable_params(s, spec) * FP32


def optimizer_step_temp_bytes(s: ModelShape, spec: RunSpec) -> float:
    if spec.device_kind == "cpu":  # per-tensor AdamW: sqrt(v) and its quotient by the bias correction
        return 2 * largest_trainable_tensor(s, spec) * FP32
    return trainable_params(s, spec) * FP32  # multi-tensor AdamW: sqrt(v) for every tensor at once


# ---------------------------------------------------------------- activations


def saved_per_token(s: ModelShape, spec: RunSpec) -> float:
    """Bytes autograd saves per token in one decoder layer (Llama-style: RMSNorm, RoPE, SDPA, gated MLP).

    What is saved depends on what requires grad: a frozen linear saves no input; RoPE's products
    save only cos/sin. fp32, full fine-tuning: each RMSNorm its input, normalized input and output
    (3d, twice), the rotated q and k and v (he + 2ke), the attention output, which o_proj saves too
    (flash attention returns it in [B, T, H, D] order: the transpose is free) (he), the log-sum-exp
    (h), the MLP's gate, SiLU, up and product (4f).
    Adapters: the norms save input and output only (4d), the rest as above plus LoRA's rank-r
    activations (7r). Prompt/prefix tuning: no linear saves anything (2d + 2he + 2ke + h + 3f).
    Packed rows: k and v are repeated to every query head (ke counts as he).
    bf16 autocast: norms stay fp32, each linear saves its own bf16 cast of its input, outputs are bf16.
    """
    d, he, ke, h, f = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.heads, s.intermediate
    if spec.packed:
        # with a mask, transformers repeats k and v to every query head before SDPA (no native GQA)
        ke = he
    lora = spec.adapter in ("lora", "qlora", "dora")
    prompt = spec.adapter in ("prompt", "prefix")
    if spec.precision == "bf16":
        if prompt:
            return FP32 * 2 * d + BF16 * (2 * he + 2 * ke + 3 * f) + FP32 * h
        norms = FP32 * (4 * d if spec.trains_base else 2 * d)
        casts = BF16 * (5 * d + f)  # q, k, v, gate, up each cast the norm output; down its input
        extra = BF16 * len(s.linear_shapes(spec.targets)) * spec.r if lora else 0
        return norms + casts + BF16 * (2 * he + 2 * ke + 3 * f) + FP32 * h + extra
    if prompt:
        return FP32 * (2 * d + 2 * he + 2 * ke + h + 3 * f)
    norms = 6 * d if spec.trains_base else 4 * d
    extra = len(s.linear_shapes(spec.targets)) * spec.r if lora else 0
    return FP32 * (norms + 2 * he + 2 * ke + h + 4 * f + extra)


def activation_bytes(s: ModelShape, spec: RunSpec) -> float:
    """Saved activations of all layers (or, with checkpointing, each layer's input plus one layer recomputed)."""
    per_layer = saved_per_token(s, spec) * spec.tokens
    # the final norm's input (and normalized input when its weight trains); its output goes to the head
    final_norm = (2 if spec.trains_base else 1) * s.hidden * FP32 * spec.tokens
    # packed rows: one [B, 1, T, T] fp32 attention mask, shared by the layers
    mask = spec.rows * spec.row_len ** 2 * FP32 if spec.packed else 0
    if spec.gradient_checkpointing:
        return s.layers * s.hidden * FP32 * spec.tokens + per_layer + final_norm + mask
    return s.layers * per_layer + final_norm + mask


def layer_backward_bytes(s: ModelShape, spec: RunSpec) -> float:
    """Backward through one decoder layer: autograd allocates a gradient for each tensor the layer saved
    (the MLP's gate, up and product, the attention's q, k, v, ...) while the saved tensors are still alive."""
    return saved_per_token(s, spec) * spec.tokens


def nf4_chunk_weights(in_features: int, out_features: int, device_kind: str) -> int:
    """Weights dequantized at once for an [out, in] NF4 linear: whole rows, whole blocks of 64, about
    NF4_CHUNK_WEIGHTS of them (`models.adapters.qlora._row_chunks`)."""
    step = math.lcm(in_features, NF4_BLOCK) // in_features
    rows = max(step, NF4_CHUNK_WEIGHTS[device_kind] // in_features // step * step)
    return min(out_features, rows) * in_features


def nf4_dequant_bytes(s: ModelShape, spec: RunSpec) -> float:
    """QLoRA: each NF4 linear is dequantized for its matmul (forward, and again in backward) a chunk of rows
    at a time into one reused workspace, sized for the largest chunk (allocated once: a fixed term)."""
    if spec.adapter != "qlora":
        return 0.0
    return NF4_DEQUANT_BYTES_PER_WEIGHT * max(nf4_chunk_weights(i, o, spec.device_kind) for i, o in s.linear_shapes())


CHUNK_ELEMENTS = 2 ** 23  # posttrain.losses.chunked: fp32 numbers per [rows, V] chunk buffer
CHUNK_BUFFERS = 4  # chunk buffers alive at once: logits, scaled logits, softmax, gradient (backward)


def logits_saved_bytes(s: ModelShape, spec: RunSpec) -> float:
    """What the chunked head keeps for backward: the hidden states at the loss positions ([N, d]; a
    trained head also keeps the gathered [B, K, d] it was called on) and a log-sum-exp per token."""
    if spec.distributed == "fsdp":
        return spec.loss_tokens * s.vocab * FP32  # plain path: the log-softmax [N, V]
    copies = 2 if spec.trains_base else 1
    return spec.loss_tokens * (copies * s.hidden + 1) * FP32


def logits_bytes(s: ModelShape, spec: RunSpec) -> float:
    """The loss path. posttrain runs the output head at loss positions only, a chunk of rows at a time
    (`models.head`, `losses.chunked`: about 2^23 fp32 numbers per [rows, V] buffer, recomputed in
    backward), so no [N, V] logits are held: the saved hidden states plus a few chunk buffers.
    A head sharded by FSDP2 takes the plain path: the head output at the labelled tokens in fp32,
    its log-softmax, then as many gradients (three [N, V] fp32 tensors)."""
    if spec.distributed == "fsdp":
        return 3 * spec.loss_tokens * s.vocab * FP32
    rows = min(spec.loss_tokens, max(1, CHUNK_ELEMENTS // s.vocab))
    return logits_saved_bytes(s, spec) + CHUNK_BUFFERS * rows * s.vocab * FP32


def autocast_copy_bytes(s: ModelShape, spec: RunSpec) -> float:
    """bf16 autocast: a bf16 copy of each matmul weight, cached (trainable) or saved per use (frozen)."""
    if spec.precision != "bf16":
        return 0.0
    head = s.vocab * s.hidden
    if spec.adapter == "qlora":  # NF4 dequantizes on the fly; only the head is cast
        return head * BF16
    if spec.gradient_checkpointing and not spec.trains_base:
        return (s.linear_weights / s.layers + head) * BF16
    return (s.linear_weights + head) * BF16


def cpu_transient_bytes(s: ModelShape, spec: RunSpec) -> float:
    """The step's tensors that are freed again (activations, the loss path, a layer's gradients): the CPU
    runtime term keeps a fitted fraction of them, the heap glibc does not give back."""
    return activation_bytes(s, spec) + logits_bytes(s, spec) + layer_backward_bytes(s, spec)


# ---------------------------------------------------------------- the whole


@dataclass
class MemoryEstimate:
    breakdown: dict[str, float]  # bytes per term (what is resident at the peak, phase terms included)
    peak_bytes: float
    train_peak_bytes: float
    load_peak_bytes: float
    peak_phase: str
    phases: dict[str, float] = field(default_factory=dict)


def estimate_memory(s: ModelShape, spec: RunSpec) -> MemoryEstimate:
    n = spec.gpus if spec.distributed == "fsdp" else 1
    on_device = 0.0 if (spec.cpu_offload and spec.distributed == "fsdp") else 1.0
    weights = base_weight_bytes(s, spec) / n * on_device
    adapter = adapter_params(s, spec) * FP32 / n * on_device
    grads = gradient_bytes(s, spec) / n * on_device
    optim = optimizer_bytes(s, spec) / n * on_device
    temp = optimizer_step_temp_bytes(s, spec) / n * on_device
    ref = base_weight_bytes(s, spec) / n if spec.reference == "copy" else 0.0
    kv_bytes = BF16 if spec.precision == "bf16" else FP32
    kv = 2 * s.layers * s.kv_heads * s.head_dim * spec.rollout_rows * spec.rollout_len * kv_bytes
    acts = activation_bytes(s, spec)
    logits = logits_bytes(s, spec)
    copies = autocast_copy_bytes(s, spec)
    head_grad = s.vocab * s.hidden * FP32 / n if spec.trains_base else 0.0
    gathered = 0.0
    if spec.distributed == "fsdp":
        unit = max(s.layer_linear, s.embedding_params + s.head_params)
        gathered = 2 * unit * (BF16 if spec.precision == "bf16" else FP32)  # current and prefetched unit
    ddp_buckets = grads if spec.distributed == "ddp" else 0.0
    layer_grads = layer_backward_bytes(s, spec)
    dequant = nf4_dequant_bytes(s, spec)
    head_saved = logits_saved_bytes(s, spec)
    runtime = (CPU_RUNTIME + CPU_RETAINED_FRACTION * cpu_transient_bytes(s, spec) if spec.device_kind == "cpu"
               else CUDA_CONTEXT)
    accum_grads = grads if spec.grad_accum > 1 else 0.0
    phases = {
        "forward_end": acts + logits + copies + accum_grads,
        "backward_head": acts + logits + head_grad + copies + accum_grads,  # the head's gradient fills chunk by chunk
        "backward_layer": acts + head_saved + layer_grads + head_grad + copies + accum_grads,
        "optimizer_step": grads + temp + ddp_buckets,
    }
    phase = max(phases, key=phases.get)
    fixed = {"weights": weights, "adapter": adapter, "optimizer": optim, "reference_model": ref, "kv_cache": kv,
             "fsdp_gathered": gathered, "nf4_dequantization": dequant, "runtime": runtime}
    if phase == "optimizer_step":
        moving = {"gradients": grads, "optimizer_step_temp": temp, "ddp_buckets": ddp_buckets}
    elif phase == "backward_layer":
        moving = {"activations": acts, "logits": head_saved, "layer_gradients": layer_grads,
                  "autocast_weight_copies": copies,
                  "gradients": accum_grads + head_grad}
    else:
        moving = {"activations": acts, "logits": logits,
                  "autocast_weight_copies": copies,
                  "gradients": accum_grads + (head_grad if phase == "backward_head" else 0.0)}
    breakdown = {k: float(v) for k, v in {**fixed, **moving}.items()}
    train_peak = sum(breakdown.values())
    # loading: posttrain loads the whole model in fp32 onto each device, then adds the adapter or
    # shards it (FSDP2); so every rank holds the full fp32 model once. QLoRA loads and quantizes on
    # the CPU, one layer at a time, releasing each fp32 weight's pages, and then moves
    # (engine/setup.py): the device, and the CPU itself, hold only the NF4 model and its adapter
    load_peak = s.total_params * FP32 + runtime
    if spec.adapter == "qlora":
        load_peak = base_weight_bytes(s, spec) + adapter_params(s, spec) * FP32 + runtime
    return MemoryEstimate(breakdown, max(train_peak, load_peak), train_peak, load_peak, phase,
                          {k: float(v) for k, v in phases.items()})
