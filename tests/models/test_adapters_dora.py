"""DoRA: magnitude + normalised direction, numerically equal to PEFT's DoRA (forward and gradients)."""

import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _ids():
    return torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def test_fresh_dora_is_identity_with_row_norm_magnitude(tiny_models):
    m = _load(tiny_models("llama"))
    ref = m(input_ids=_ids()).logits
    A.apply(m, AdapterConfig(type="dora", r=8))
    layer = m.model.layers[1].mlp.up_proj
    ad = layer.adapters["default"]
    torch.testing.assert_close(ad.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    assert (m(input_ids=_ids()).logits - ref).abs().max() < 1e-5
    assert A.adapter_type(m) == "dora"


def _peft_dora(path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    pm = get_peft_model(_load(path), LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear",
                                                init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))  # magnitude away from the row norms
    return pm


def test_peft_dora_loads_here_with_equal_logits_and_gradients(tiny_models, tmp_path):
    path = tiny_models("qwen2")
    pm = _peft_dora(path)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = A.load_adapter(_load(path), tmp_path / "peft", trainable=True)
    ids = _ids()
    pm.train(), ours.train()  # dropout is 0: train mode only switches PEFT's DoRA caching off
    lp, lo = pm(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert (lp.logits - lo.logits).abs().max() < 1e-4
    lp.loss.backward(), lo.loss.backward()
    # the detached norm (DoRA section 4.3) shapes these gradients; they must match PEFT's
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    layer = ours.model.layers[0].self_attn.k_proj.adapters["default"]
    key = "base_model.model.model.layers.0.self_attn.k_proj"
    for ours_p, their_name in ((layer.lora_A.weight, f"{key}.lora_A.default.weight"),
                               (layer.lora_B.weight, f"{key}.lora_B.default.weight"),
                               (layer.lora_magnitude_vector, f"{key}.lora_magnitude_vector.default.weight")):
        torch.testing.assert_close(ours_p.grad, theirs[their_name], atol=1e-6, rtol=1e-4)


def test_our_dora_loads_in_peft_and_merges(tiny_models, tmp_path):
    from peft import PeftModel

    path = tiny_models("llama")
    m = _load(path)
    A.apply(m, AdapterConfig(type="dora", r=8))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
            if "magnitude" in n:
                p.mul_(1.1)
    ids = _ids()
    ours = m(input_ids=ids).logits
    A.save(m, tmp_path / "dora")  # warns: vLLM does not serve DoRA
    keys = A.read_adapter(tmp_path / "dora")[1]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    pm = PeftModel.from_pretrained(_load(path), str(tmp_path / "dora")).eval()
    assert (pm(input_ids=ids).logits - ours).abs().max() < 1e-4
    d = A.describe(tmp_path / "dora")
    assert d["type"] == "dora" and not d["vllm_servable"] and "DoRA" in d["vllm_reasons"][0]
    A.merge(m)
    assert (m(input_ids=ids).logits - ours).abs().max() < 1e-4
