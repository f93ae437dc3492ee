"""Several LoRA adapters on one base, chosen per row: a mixed batch equals each adapter alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _make_adapter(path, out, seed, **kw):
    torch.manual_seed(seed)
    m = _load(path)
    A.apply(m, AdapterConfig(type="lora", r=8, **kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    A.save(m, out)
    return out


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    path = tiny_models("qwen2")
    d = tmp_path_factory.mktemp("multi")
    a = _make_adapter(path, d / "a", 1)
    b = _make_adapter(path, d / "b", 2, targets=["q_proj", "v_proj", "down_proj"])  # different targets
    return path, a, b


def test_mixed_batch_scores_equal_each_adapter_alone(setup):
    path, a, b = setup
    ids = torch.randint(3, 400, (4, 9), generator=torch.Generator().manual_seed(0))
    alone = {"a": A.load_adapter(_load(path), a)(input_ids=ids).logits,
             "b": A.load_adapter(_load(path), b)(input_ids=ids).logits,
             "none": _load(path)(input_ids=ids).logits}
    assert (alone["a"] - alone["b"]).abs().max() > 1e-2  # the adapters really differ
    m = A.load_adapters(_load(path), {"a": a, "b": b})
    assert A.adapter_names(m) == ["a", "b"]
    names = ["b", "none", "a", "b"]
    with A.select(m, names):
        mixed = m(input_ids=ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[n][i], atol=1e-5, rtol=0)
    with A.select(m, "b"):
        torch.testing.assert_close(m(input_ids=ids).logits, alone["b"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m(input_ids=ids).logits, alone["a"], atol=1e-5, rtol=0)  # first is the default


def test_mixed_batch_generation_with_left_padding(setup, tokenizer):
    path, a, b = setup
    prompts = ["Hello, how can I help", "What is 2 + 3?", "The quick brown fox"]
    names = ["a", "none", "b"]
    m = A.load_adapters(_load(path), {"a": a, "b": b})
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    with A.select(m, names):
        mixed = m.generate(**enc, max_new_tokens=8, do_sample=False)
    for i, n in enumerate(names):
        one = tokenizer([prompts[i]], return_tensors="pt")
        with A.select(m, n):
            alone = m.generate(**one, max_new_tokens=8, do_sample=False)
        assert mixed[i, -8:].tolist() == alone[0, -8:].tolist()


def test_select_errors(setup):
    path, a, b = setup
    m = A.load_adapters(_load(path), {"a": a, "b": b})
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        with A.select(m, ["a", "c"]):
            pass
    with pytest.raises(ValueError, match="2 adapter names were given but the batch has 3 rows"):
        with A.select(m, ["a", "b"]):
            m(input_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="already loaded"):
        A.load_adapters(m, {"a": a})
