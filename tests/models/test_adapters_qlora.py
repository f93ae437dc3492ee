"""QLoRA: NF4 base (torchao) with fp32 LoRA on top; memory, training, generation, save/merge on CPU."""

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
