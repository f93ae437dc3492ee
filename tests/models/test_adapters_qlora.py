"""QLoRA: NF4 base (torchao) with fp32 LoRA on top; memory, training, generation, save/merge on CPU."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A

pytest.importorskip("torchao")


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _ids():
    return torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def test_nf4_memory_and_quantization_error(tiny_models):
    from posttrain.models.adapters.qlora import NF4Linear, linear_weight_bytes

    m = _load(tiny_models("qwen2", hidden=128, intermediate=256))
    ref = m(input_ids=_ids()).logits
    full = linear_weight_bytes(m)
    A.apply(m, AdapterConfig(type="qlora", r=8))
    mem = linear_weight_bytes(m)
    assert mem["bf16"] == full["bf16"]
    assert mem["stored"] <= 0.35 * mem["bf16"], mem
    layer = m.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, NF4Linear)
    w = layer.base_layer.dequantized_weight().float()
    orig = _load(tiny_models("qwen2", hidden=128, intermediate=256)).model.layers[0].mlp.down_proj.weight
    # 4-bit codes: a per-weight error well under the block absmax, but not zero
    err = (w - orig).abs().max() / orig.abs().max()
    assert 0 < err < 0.15
    out = m(input_ids=_ids()).logits  # fresh LoRA: only the quantization changes the logits
    assert 0 < (out - ref).abs().max() < 0.5
    assert all(p.dtype == torch.float32 for p in A.trainable_parameters(m))


def test_qlora_trains_and_generates_on_cpu(tiny_models, tmp_path):
    path = tiny_models("llama")
    m = _load(path)
    A.apply(m, AdapterConfig(type="qlora", r=8, targets=["q_proj", "v_proj", "up_proj"]))
    ids = _ids()
    opt = torch.optim.AdamW(A.trainable_parameters(m), lr=1e-2)
    m.train()
    losses = []
    for _ in range(6):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    m.eval()
    gen = m.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    cur = ids[:1, :5]
    for _ in range(6):  # greedy without a cache must agree with generate
        cur = torch.cat([cur, m(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert gen.tolist() == cur.tolist()
    adapted = m(input_ids=ids).logits
    A.save(m, tmp_path / "q")
    assert A.describe(tmp_path / "q")["type"] == "qlora"
    again = A.load_adapter(_load(path), tmp_path / "q")  # back on an NF4 base, as it was trained
    assert A.adapter_type(again) == "qlora"
    assert (again(input_ids=ids).logits - adapted).abs().max() < 1e-5
    resumed = A.apply(_load(path), AdapterConfig(type="qlora", path=str(tmp_path / "q")))  # continue training
    assert A.adapter_type(resumed) == "qlora"
    assert sum(p.numel() for p in A.trainable_parameters(resumed)) == A.describe(tmp_path / "q")["trainable_params"]
    A.merge_to_dir(path, tmp_path / "q", tmp_path / "merged")  # the NF4 base is dequantized, then merged
    merged = _load(tmp_path / "merged")
    assert (merged(input_ids=ids).logits - adapted).abs().max() < 1e-4
    A.merge(m)
    assert (m(input_ids=ids).logits - adapted).abs().max() < 1e-4


def _mapping_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_quantizing_releases_the_mapped_fp32_pages(tiny_models):
    """The fp32 weights are pages of the mapped safetensors file: once a weight is quantized its pages
    leave the process's RSS, and reading the old tensor again gives the file's values (MADV_DONTNEED on
    a private file mapping drops pages, never data)."""
    from posttrain.models.adapters.qlora import quantize_linears, release_pages
    from posttrain.models.loading import load

    path = tiny_models("llama", hidden=256, intermediate=1024, layers=2)
    file = path / "model.safetensors"
    m, _ = load(path, dtype="fp32", device="cpu")
    w = m.model.layers[0].mlp.up_proj.weight.detach()
    copy = w.clone()  # reads every page of the weight
    linear_bytes = sum(x.weight.numel() * 4 for x in m.model.layers.modules() if isinstance(x, torch.nn.Linear))
    before = _mapping_rss(file)
    assert before >= w.numel() * 4
    released = release_pages(w)
    assert released >= w.numel() * 4 - 2 * 4096
    assert _mapping_rss(file) <= before - released + 4096
    assert torch.equal(w, copy)  # faulted in again from the file, unchanged
    assert release_pages(copy) == 0  # anonymous memory is never released
    for x in m.model.layers.modules():
        if isinstance(x, torch.nn.Linear):
            x.weight.detach().sum()  # every decoder weight resident, as a forward would leave them
    resident = _mapping_rss(file)
    assert resident >= linear_bytes
    others = sum(p.numel() * 4 for p in m.parameters()) - linear_bytes
    quantize_linears(m)  # embeddings and norms: still mapped
    assert _mapping_rss(file) <= others + 16 * 4096
    assert resident - _mapping_rss(file) >= linear_bytes - 16 * 4096


def test_nf4_linear_matches_its_dequantized_weight_and_saves_no_dense_copy():
    """Forward and input gradient equal a plain linear on the dequantized weight; autograd saves the
    NF4 weight only (NF4Matmul dequantizes again in backward), never a dense [out, in] copy."""
    from posttrain.models.adapters.qlora import NF4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=False)
    q = NF4Linear(lin)
    dense = q.dequantized_weight().float()
    x = torch.randn(4, 256, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((type(t).__name__, tuple(t.shape))) or t,
                                                  lambda t: t):
        y = q(x)
    y2 = torch.nn.functional.linear(x2, dense)
    assert torch.allclose(y, y2, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert saved == [("NF4Tensor", (512, 256))]


@pytest.mark.parametrize("shape", [(4608, 256), (256, 4608), (96, 200), (1000, 192)])
def test_chunked_dequantization_is_torchaos_bit_for_bit_and_the_matmul_agrees(shape):
    """NF4Matmul dequantizes a chunk of rows at a time: the rows, put together, are exactly torchao's
    `get_original_weight`; the forward equals torchao's `linear_nf4` exactly (same values, each output
    column one full dot product) and the input gradient within fp32 rounding (summed over chunks);
    under bf16 autocast both run in bf16. Weights whose rows do not hold whole blocks of 64 (200 wide)
    chunk at a multiple of the rows that do."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    from posttrain.models.adapters.qlora import NF4Linear, _row_chunks, dequantized_rows

    torch.manual_seed(0)
    q = NF4Linear(torch.nn.Linear(shape[1], shape[0], bias=False))
    w = q.weight
    chunks = _row_chunks(w)
    assert chunks[0][0] == 0 and chunks[-1][1] == shape[0]
    assert all(r0 * shape[1] % 64 == 0 for r0, _ in chunks)
    if shape[0] * shape[1] >= 2**20:
        assert len(chunks) >= 4, chunks  # a 1.2M-weight linear is never dequantized whole on the CPU
    scalers = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
    rows = torch.cat([dequantized_rows(w, scalers, r0, r1, torch.bfloat16).clone() for r0, r1 in chunks])  # a view of the workspace
    assert torch.equal(rows, w.get_original_weight())

    x = torch.randn(3, 50, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), linear_nf4(x2, w)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = q(x), linear_nf4(x, w)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


QUANTIZE_PROBE = """
import sys, torch
from posttrain.models.adapters import qlora
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":"))
qlora.QUANTIZE_CHUNK = int(sys.argv[1])
lin = torch.nn.Linear(1024, 4096, bias=False)
qlora.NF4Linear(torch.nn.Linear(64, 64, bias=False))  # imports and lazy set-up
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
q = qlora.NF4Linear(lin)
print((kib("VmHWM") - before) * 1024)
"""


def test_quantizing_in_small_chunks_gives_torchaos_codes_with_a_fraction_of_its_temporaries():
    """NF4Linear runs torchao's quantizer with 2^14 weights per nearest-level search instead of its 2^20 (a
    [2^20, 16] bf16 comparison, 32 MiB, twice): the same codes and scales, and on a 4M-weight linear
    (8 MiB in bf16) the quantizer's peak falls from 83 to 24 MiB (measured with every freed block leaving
    the RSS). The 32 MiB blocks also raised glibc's mmap threshold for the rest of the run (docs/advise.md)."""
    from torchao.quantization import to_nf4
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    from posttrain.models.adapters.qlora import QUANTIZE_CHUNK, NF4Linear

    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 4608, bias=False)
    ours = NF4Linear(lin).weight
    assert nf4_tensor.CHUNK_SIZE == 2**20  # torchao's own setting is restored
    theirs = to_nf4(lin.weight.detach().to(torch.bfloat16), 64, ours.scaler_block_size)
    for part in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
        assert torch.equal(getattr(ours, part), getattr(theirs, part)), part
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's VmHWM reset")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    peak = {chunk: int(subprocess.run([sys.executable, "-c", QUANTIZE_PROBE, str(chunk)], capture_output=True,
                                      text=True, env=env, check=True).stdout.split()[-1])
            for chunk in (2**20, QUANTIZE_CHUNK)}
    assert peak[2**20] >= 64 * 2**20, peak
    assert peak[QUANTIZE_CHUNK] <= 32 * 2**20, peak


def test_nf4_matmuls_in_two_threads_do_not_share_a_chunk():
    """The dequantization workspace is shared; two threads running NF4 matmuls at once (a server beside a
    training) take turns on it, so each gets exactly its serial result."""
    import threading

    from posttrain.models.adapters.qlora import NF4Linear

    torch.manual_seed(0)
    layers = [NF4Linear(torch.nn.Linear(256, 2048, bias=False)) for _ in range(2)]
    xs = [torch.randn(8, 256) for _ in range(2)]
    want = [layer(x) for layer, x in zip(layers, xs)]
    bad = []

    def run(i):
        for _ in range(30):
            if not torch.equal(layers[i](xs[i]), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
