"""LoRA / rsLoRA: init, scaling, targets, freezing, disabled(), packing, save/load, merge, describe."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A
from posttrain.models.adapters.lora import LoraLinear


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _randomize_b(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def ids():
    return torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_is_identity_and_init_matches_peft_default(tiny_models, ids):
    m = _load(tiny_models("qwen2"))
    ref = m(input_ids=ids).logits
    A.apply(m, AdapterConfig(type="lora", r=8))
    assert torch.equal(m(input_ids=ids).logits, ref)
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


def test_only_adapter_weights_train(tiny_models, ids):
    m = _load(tiny_models("llama"))
    A.apply(m, AdapterConfig(type="lora", r=8, targets=["q_proj", "v_proj"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * m.config.num_hidden_layers  # (A, B) x (q, v) x layers
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(A.trainable_parameters(m), lr=0.1)
    m.train()
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B gets gradient even though it starts at zero


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_alpha_over_r_or_sqrt_r(tiny_models, rslora):
    m = _load(tiny_models("qwen2"))
    A.apply(m, AdapterConfig(type="lora", r=16, alpha=8, rslora=rslora, targets=["o_proj"]))
    layer = m.model.layers[0].self_attn.o_proj
    _randomize_b(m)
    ad = layer.adapters["default"]
    x = torch.randn(3, layer.in_features)
    expected_scale = 8 / (4 if rslora else 16)
    want = layer.base_layer(x) + expected_scale * x @ ad.lora_A.weight.T @ ad.lora_B.weight.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_targets_names_regex_all_linear_and_errors(tiny_models):
    m = _load(tiny_models("qwen2"))
    allp = A.resolve_targets(m, "all-linear")
    assert "lm_head" not in allp and len(allp) == 7 * m.config.num_hidden_layers
    assert A.resolve_targets(m, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert A.resolve_targets(m, r".*\.0\.mlp\.(up|down)_proj") == ["model.layers.0.mlp.up_proj",
                                                                    "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"matched no linear layer.*q_proj"):
        A.resolve_targets(m, ["qproj"])
    gemma = _load(tiny_models("gemma"))  # tied head: still excluded
    assert not any("lm_head" in p for p in A.resolve_targets(gemma, "all-linear"))


def test_disabled_runs_the_plain_base(tiny_models, ids):
    m = _load(tiny_models("llama"))
    ref = m(input_ids=ids).logits
    A.apply(m, AdapterConfig(type="lora", r=8))
    _randomize_b(m)
    adapted = m(input_ids=ids).logits
    assert (adapted - ref).abs().max() > 1e-2
    with A.disabled(m):
        assert torch.equal(m(input_ids=ids).logits, ref)
    assert torch.equal(m(input_ids=ids).logits, adapted)
    assert A.is_adapted(m) and A.adapter_type(m) == "lora"


def test_packed_4d_mask_matches_unpacked(tiny_models):
    m = _load(tiny_models("qwen2"))
    A.apply(m, AdapterConfig(type="lora", r=8))
    _randomize_b(m)
    a, b = torch.arange(5, 12).unsqueeze(0), torch.arange(40, 45).unsqueeze(0)
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    seg = torch.tensor([0] * 7 + [1] * 5)
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    packed = m(input_ids=row, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(packed[:, :7], m(input_ids=a).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 7:], m(input_ids=b).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft(tiny_models, tmp_path, ids, arch, rslora):
    from peft import PeftModel

    path = tiny_models(arch)
    m = _load(path)
    A.apply(m, AdapterConfig(type="lora", r=8, alpha=4, rslora=rslora))
    _randomize_b(m)
    ours = m(input_ids=ids).logits
    A.save(m, tmp_path / "ad")
    keys = set(A.read_adapter(tmp_path / "ad")[1])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    theirs = PeftModel.from_pretrained(_load(path), str(tmp_path / "ad")).eval()
    assert (theirs(input_ids=ids).logits - ours).abs().max() < 1e-4
    # and back into posttrain through posttrain.load(model, adapter=DIR)
    from posttrain.models.loading import load

    again, _ = load(path, adapter=tmp_path / "ad", device="cpu")
    assert (again(input_ids=ids).logits - ours).abs().max() < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapter_loads_here(tiny_models, tmp_path, ids, rslora):
    from peft import LoraConfig, get_peft_model

    path = tiny_models("qwen2")
    pm = get_peft_model(_load(path), LoraConfig(r=8, lora_alpha=16, use_rslora=rslora,
                                                target_modules=["q_proj", "k_proj", "down_proj"],
                                                init_lora_weights=False))  # random B: a meaningful check
    pm.eval()
    theirs = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = A.load_adapter(_load(path), tmp_path / "peft")
    assert (ours(input_ids=ids).logits - theirs).abs().max() < 1e-4
    assert A.trainable_parameters(ours) == []  # loaded for inference


def test_merge_equals_adapted_and_merge_to_dir(tiny_models, tmp_path, ids):
    path = tiny_models("llama")
    m = _load(path)
    A.apply(m, AdapterConfig(type="lora", r=8))
    _randomize_b(m, std=0.1)
    adapted = m(input_ids=ids).logits
    A.save(m, tmp_path / "ad")
    A.merge(m)
    assert not A.is_adapted(m) and not any(isinstance(x, LoraLinear) for x in m.modules())
    assert (m(input_ids=ids).logits - adapted).abs().max() < 1e-4
    A.merge_to_dir(path, tmp_path / "ad", tmp_path / "merged")
    merged = _load(tmp_path / "merged")
    assert set(merged.state_dict()) == set(_load(path).state_dict())
    assert (merged(input_ids=ids).logits - adapted).abs().max() < 1e-4


def test_describe_and_vllm_warning(tiny_models, tmp_path):
    m = _load(tiny_models("qwen2"))
    A.apply(m, AdapterConfig(type="lora", r=16, targets=["q_proj", "v_proj"]))
    A.save(m, tmp_path / "ok")
    d = A.describe(tmp_path / "ok")
    assert d["type"] == "lora" and d["rank"] == 16 and d["vllm_servable"]
    assert d["trainable_params"] == sum(p.numel() for p in A.trainable_parameters(m))
    assert d["size_bytes"] > d["trainable_params"] * 4
    text = A.format_description(d)
    assert "rank         16" in text and "servable" in text
    m2 = _load(tiny_models("qwen2"))
    with pytest.warns(UserWarning, match="rank \\[12\\] is not one of vLLM"):
        A.apply(m2, AdapterConfig(type="lora", r=12))
    with pytest.warns(UserWarning, match="vLLM"):
        A.save(m2, tmp_path / "r12")
    assert not A.describe(tmp_path / "r12")["vllm_servable"]


def test_bad_adapter_dirs_fail_clearly(tiny_models, tmp_path):
    m = _load(tiny_models("qwen2"))
    with pytest.raises(A.AdapterFormatError, match="adapter_config.json is missing"):
        A.load_adapter(m, tmp_path)
    with pytest.raises(ValueError, match="already has a lora adapter"):
        A.apply(A.apply(m, AdapterConfig(type="lora")), AdapterConfig(type="lora"))
