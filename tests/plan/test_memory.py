"""Each term of the planner's memory formula against what posttrain really allocates on tiny models.

The activation terms are checked against the tensors autograd saves (a saved-tensors hook counts
every distinct storage), so a change in what transformers or posttrain keep for backward shows here.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from posttrain.config import AdapterConfig
from posttrain.models import adapters
from posttrain.models.adapters.qlora import linear_weight_bytes
from posttrain.models.loading import load
from posttrain.plan.memory import (
    NF4_BYTES_PER_WEIGHT, NF4_CHUNK_WEIGHTS, NF4_DEQUANT_BYTES_PER_WEIGHT, RunSpec, activation_bytes, adapter_params,
    autocast_copy_bytes, base_weight_bytes, estimate_memory, gradient_bytes, layer_backward_bytes, logits_bytes,
    logits_saved_bytes, nf4_chunk_weights, nf4_dequant_bytes, optimizer_bytes, saved_per_token,
)
from posttrain.plan.shapes import read_shape
from posttrain.stages.sft import LMStage

SHAPE = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=320, vocab_size=1000)
B, T = 2, 48  # 96 tokens: no activation shares a shape with a weight


@pytest.fixture
def model_dir(tiny_models, arch):
    return tiny_models(arch, **SHAPE)


def _model(path, kind="none"):
    model, tok = load(path, dtype="fp32", device="cpu")
    if kind == "none":
        model.requires_grad_(True)
    else:
        torch.manual_seed(0)
        model = adapters.apply(model, AdapterConfig(type=kind, r=8, num_virtual_tokens=4), tokenizer=tok)
    return model.train()


def _batch():
    ids = torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def saved_bytes(model, precision="fp32", batch=None) -> dict:
    """Bytes autograd saves in one SFT forward, split into logits ([N, V] rows), bf16 weight copies
    (2-D bf16 tensors shaped like a weight) and activations (everything else but parameters)."""
    params = set()
    weight_shapes = set()
    for p in model.parameters():
        try:
            params.add(p.untyped_storage().data_ptr())
        except RuntimeError:  # NF4 tensor subclasses have no plain storage
            pass
        if p.dim() == 2:
            weight_shapes |= {tuple(p.shape), tuple(p.shape)[::-1]}
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
        except RuntimeError:  # an NF4 weight saved by linear_nf4: a parameter, not an activation
            return t
        if ptr not in params:
            seen[ptr] = (s.nbytes(), t.dtype, tuple(t.shape))
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        LMStage("sft").loss(model, batch if batch is not None else _batch())
    out = {"logits": 0, "weight_copies": 0, "activations": 0}
    vocab = model.config.vocab_size
    for nbytes, dtype, shape in seen.values():
        if dtype == torch.bfloat16 and shape in weight_shapes:
            out["weight_copies"] += nbytes
        elif len(shape) == 2 and shape[-1] == vocab:
            out["logits"] += nbytes
        else:
            out["activations"] += nbytes
    return out


def test_parameter_counts_match_the_loaded_model(model_dir):
    shape = read_shape(model_dir)
    model = _model(model_dir)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert base_weight_bytes(shape, RunSpec()) == 4 * shape.total_params


@pytest.mark.parametrize("kind", ["lora", "dora", "prompt", "prefix"])
def test_adapter_parameters_match_what_apply_adds(tiny_models, kind):
    path = tiny_models("llama", **SHAPE)
    model = _model(path, kind)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_params(read_shape(path), RunSpec(adapter=kind, r=8, num_virtual_tokens=4)) == trainable


def test_nf4_weight_bytes_match_torchao(tiny_models):
    path = tiny_models("llama", **SHAPE)
    shape = read_shape(path)
    stored = linear_weight_bytes(_model(path, "qlora"))["stored"]
    # tiny layers use a smaller block of scales than 256, so a little more than 4.127 bits per weight
    assert shape.linear_params * NF4_BYTES_PER_WEIGHT == pytest.approx(stored, rel=0.01)
    assert base_weight_bytes(shape, RunSpec(adapter="qlora")) == pytest.approx(
        stored + 4 * (shape.total_params - shape.linear_params), rel=0.01)


def test_qlora_on_the_cpu_counts_nf4_linears_alone(tiny_models):
    """On the CPU QLoRA releases each quantized weight's mapped fp32 pages (models.adapters.qlora), so its
    weights are the NF4 linears plus the fp32 rest, as on a GPU, and loading peaks at the NF4 model too."""
    shape = read_shape(tiny_models("llama", **SHAPE))
    cpu = RunSpec(adapter="qlora", device_kind="cpu")
    nf4 = shape.linear_params * NF4_BYTES_PER_WEIGHT + 4 * (shape.total_params - shape.linear_params)
    assert base_weight_bytes(shape, cpu) == base_weight_bytes(shape, RunSpec(adapter="qlora")) == nf4
    est = estimate_memory(shape, cpu)
    assert est.load_peak_bytes == nf4 + 4 * adapter_params(shape, cpu) + est.breakdown["runtime"]
    lora = estimate_memory(shape, RunSpec(adapter="lora", device_kind="cpu"))
    assert lora.breakdown["weights"] - est.breakdown["weights"] == pytest.approx(
        shape.linear_params * (4 - NF4_BYTES_PER_WEIGHT))


@pytest.mark.parametrize("kind", ["none", "lora"])
def test_gradient_and_adamw_state_bytes(tiny_models, kind):
    from posttrain.engine.optim import build_optimizer

    path = tiny_models("qwen2", **SHAPE)
    model = _model(path, kind)
    loss, _ = LMStage("sft").loss(model, _batch())
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    spec = RunSpec(adapter=kind, r=8)
    assert grads == gradient_bytes(read_shape(path), spec)
    assert state == optimizer_bytes(read_shape(path), spec)


@pytest.mark.parametrize("kind", ["none", "lora", "qlora", "prompt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saved_activations_and_logits(model_dir, kind, precision):
    if kind == "qlora" and precision == "fp32":
        pytest.skip("covered by bf16 (NF4 dequantizes to the input's dtype)")
    shape = read_shape(model_dir)
    got = saved_bytes(_model(model_dir, kind), precision)
    spec = RunSpec(adapter=kind, r=8, num_virtual_tokens=4, batch_size=B, seq_len=T, precision=precision)
    # the formula leaves out tensors of a few numbers per token (RMSNorm's rsqrt, ids, masks, cos/sin)
    want = activation_bytes(shape, spec) + logits_saved_bytes(shape, spec)
    assert got["activations"] == pytest.approx(want, rel=0.08)
    assert got["logits"] == 0  # the chunked head saves no [N, V] logits
    chunk_rows = min(spec.loss_tokens, 2 ** 23 // shape.vocab)
    assert logits_bytes(shape, spec) - logits_saved_bytes(shape, spec) == 4 * chunk_rows * shape.vocab * 4
    if precision == "bf16" and kind == "none":
        assert got["weight_copies"] == autocast_copy_bytes(shape, spec)


def test_checkpointing_saves_each_layer_input(tiny_models):
    path = tiny_models("llama", **SHAPE)
    shape = read_shape(path)
    model, _ = load(path, dtype="fp32", device="cpu", gradient_checkpointing=True)
    got = saved_bytes(model.requires_grad_(True).train())
    spec = RunSpec(batch_size=B, seq_len=T, gradient_checkpointing=True)
    got["activations"] -= logits_saved_bytes(shape, spec)
    one_layer = activation_bytes(shape, RunSpec(batch_size=B, seq_len=T)) - 2 * shape.hidden * 4 * B * T
    one_layer /= shape.layers
    # the forward saves inputs only; the formula adds the one layer recomputed during backward
    assert got["activations"] == pytest.approx(activation_bytes(shape, spec) - one_layer, rel=0.05)


def test_sharding_reference_and_kv_cache_terms(tiny_models):
    shape = read_shape(tiny_models("llama", **SHAPE))
    one = estimate_memory(shape, RunSpec())
    fsdp = estimate_memory(shape, RunSpec(gpus=4, distributed="fsdp"))
    for term in ("weights", "optimizer"):
        assert fsdp.breakdown[term] == pytest.approx(one.breakdown[term] / 4)
    assert fsdp.load_peak_bytes == one.load_peak_bytes  # every rank loads the full fp32 model first
    ref = estimate_memory(shape, RunSpec(reference="copy"))
    assert ref.breakdown["reference_model"] == one.breakdown["weights"]
    kv = estimate_memory(shape, RunSpec(rollout_rows=8, rollout_len=100)).breakdown["kv_cache"]
    assert kv == 2 * shape.layers * shape.kv_heads * shape.head_dim * 8 * 100 * 4


def test_packed_rows_repeat_kv_and_keep_one_mask(tiny_models):
    from posttrain.data.collate import collate_packed
    from posttrain.data.render import Tokenized

    path = tiny_models("llama", **SHAPE)
    shape = read_shape(path)
    model = _model(path)
    a, b = Tokenized(list(range(3, 23)), list(range(3, 23)), "a"), Tokenized(list(range(5, 33)), list(range(5, 33)), "b")
    batch = collate_packed([[a, b], [a, b]], 0, T)
    seen = saved_bytes(model, batch=batch)
    spec = RunSpec(batch_size=B, seq_len=T, packed=True, loss_fraction=(batch["labels"][:, 1:] != -100).float().mean().item())
    want = activation_bytes(shape, spec) + logits_saved_bytes(shape, spec)
    unpacked = activation_bytes(shape, dataclasses.replace(spec, packed=False)) + logits_saved_bytes(shape, spec)
    assert seen["activations"] == pytest.approx(want, rel=0.03)
    assert seen["activations"] != pytest.approx(unpacked, rel=0.03)  # the packed terms are needed


DEQUANT_PROBE = """
import torch
from posttrain.models.adapters.qlora import NF4Linear
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":"))
q = NF4Linear(torch.nn.Linear(192, 4608, bias=False))
x = torch.randn(16, 192, requires_grad=True)
NF4Linear(torch.nn.Linear(192, 64, bias=False))(x).sum().backward()  # lazy set-up, a small workspace
x.grad = None
before = kib("VmRSS")
q(x).sum().backward()  # grows the workspace to the large weight's chunk
kept = kib("VmRSS") - before
x.grad = None
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
q(x).sum().backward()
from posttrain.models.adapters.qlora import WORKSPACE
held = sum(t.numel() * t.element_size() for b in WORKSPACE.buffers.values() for t in {id(v): v for v in b.values()}.values())
print(held, kept * 1024, (kib("VmHWM") - before) * 1024)
"""


def test_nf4_dequantization_workspace_per_weight(tiny_models):
    """The NF4 matmul dequantizes a chunk of rows at a time (forward and backward) into one workspace that
    every later matmul reuses. Measured with every allocation mmapped (so that what is freed leaves RSS
    at once): the first forward and backward leaves the workspace resident, 10 bytes per weight of one
    chunk (a 4608 x 192 weight is dequantized in 4 chunks of 1,365 rows; measured 2.5 MiB of workspace
    and 3.5 MiB of RSS); the second allocates only its output and the input's gradient."""
    pytest.importorskip("torchao")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's VmHWM reset")
    from posttrain.models.adapters.qlora import CHUNK_WEIGHTS

    assert CHUNK_WEIGHTS == {"cpu": NF4_CHUNK_WEIGHTS["cpu"], "cuda": NF4_CHUNK_WEIGHTS["gpu"]}
    # the planner mirrors the matmul's chunking without importing torch: the largest chunk agrees
    from posttrain.models.adapters.qlora import NF4Linear, _row_chunks

    for out_f, in_f in [(4608, 192), (96, 200), (14336 // 8, 4096 // 8), (64, 14336)]:
        w = NF4Linear(torch.nn.Linear(in_f, out_f, bias=False)).weight
        assert nf4_chunk_weights(in_f, out_f, "cpu") == max((r1 - r0) * in_f for r0, r1 in _row_chunks(w))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DEQUANT_PROBE], capture_output=True, text=True, env=env, check=True)
    held, kept, second = (int(v) for v in out.stdout.split()[-3:])
    assert nf4_chunk_weights(192, 4608, "cpu") == 1365 * 192
    assert held == NF4_DEQUANT_BYTES_PER_WEIGHT * nf4_chunk_weights(192, 4608, "cpu")
    assert held <= kept <= 1.6 * held, (held, kept)  # resident: the workspace, and little else
    assert second <= 16 * 4608 * 4 + 16 * 192 * 4 + 64 * 1024, second  # y, dL/dx and a page or so
    shape = read_shape(tiny_models("llama", **SHAPE))
    qlora = RunSpec(adapter="qlora", batch_size=B, seq_len=T, device_kind="cpu")
    assert nf4_dequant_bytes(shape, qlora) == NF4_DEQUANT_BYTES_PER_WEIGHT * 320 * 128  # the MLP's, under a chunk
    wide = dataclasses.replace(shape, hidden=4096, intermediate=14336)
    assert nf4_dequant_bytes(wide, qlora) == NF4_DEQUANT_BYTES_PER_WEIGHT * 64 * 4096  # 64 rows of q, k, v, gate, up
    gpu = dataclasses.replace(qlora, device_kind="gpu")
    assert nf4_dequant_bytes(wide, gpu) == NF4_DEQUANT_BYTES_PER_WEIGHT * 1024 * 4096
    assert nf4_dequant_bytes(shape, dataclasses.replace(qlora, adapter="lora")) == 0
    assert estimate_memory(shape, qlora).breakdown["nf4_dequantization"] == nf4_dequant_bytes(shape, qlora)


def test_backward_through_a_layer_is_its_own_phase(tiny_models):
    """With checkpointing, a wide MLP and a small vocabulary (scenario (d)'s shape) the largest moment is
    the backward of the last layer: every activation, the head's saved states, a gradient for each
    tensor that layer saved, and the NF4 dequantization."""
    shape = dataclasses.replace(read_shape(tiny_models("llama", **SHAPE)), intermediate=4608)
    spec = RunSpec(adapter="qlora", batch_size=B, seq_len=T, gradient_checkpointing=True, grad_accum=4)
    est = estimate_memory(shape, spec)
    assert est.peak_phase == "backward_layer"
    assert layer_backward_bytes(shape, spec) == saved_per_token(shape, spec) * B * T
    assert est.phases["backward_layer"] == pytest.approx(
        activation_bytes(shape, spec) + logits_saved_bytes(shape, spec) + layer_backward_bytes(shape, spec)
        + gradient_bytes(shape, spec))
    assert est.breakdown["layer_gradients"] == layer_backward_bytes(shape, spec)
