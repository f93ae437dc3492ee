"""`LoraLinear`'s fast path (one plain LoRA adapter, no dropout, no DoRA) against the general path."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A


def _layer(tiny_models, type="lora", **kw):
    m = AutoModelForCausalLM.from_pretrained(str(tiny_models("qwen2")))
    A.apply(m, AdapterConfig(type=type, r=8, targets=["q_proj"], **kw))
    layer = m.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return m, layer


def _out_and_grads(layer, x, general: bool):
    x = x.clone().requires_grad_(True)
    ad = layer.adapters["default"]
    y = ad(x, layer.base_layer(x), layer) if general else layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad, ad.lora_A.weight.grad, ad.lora_B.weight.grad]
    ad.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_fast_path_is_bitwise_the_general_path(tiny_models, autocast):
    _, layer = _layer(tiny_models)
    assert layer._lean() is layer.adapters["default"]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fast, fast_grads = _out_and_grads(layer, x, general=False)
        slow, slow_grads = _out_and_grads(layer, x, general=True)
    assert fast.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(fast, slow)  # same ops in the same order: bit for bit
    for f, s in zip(fast_grads, slow_grads):
        assert f is not None and torch.equal(f, s)


def test_fast_path_only_for_one_plain_adapter(tiny_models):
    m, layer = _layer(tiny_models, dropout=0.1)
    assert layer._lean() is None  # dropout: the general path
    m, layer = _layer(tiny_models, type="dora")
    assert layer._lean() is None
    m, layer = _layer(tiny_models)
    with A.disabled(m):
        assert layer._lean() is None
        x = torch.randn(3, layer.in_features)
        assert torch.equal(layer(x), layer.base_layer(x))
    st = A.get_state(m)
    st.rows = [("default", torch.tensor([0, 1]))]
    assert layer._lean() is None
    st.rows = None
    assert layer._lean() is not None
