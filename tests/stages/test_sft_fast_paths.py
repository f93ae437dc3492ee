"""SFT's fast paths give the plain path's loss and gradients.

- The output head runs only at positions whose next token is trained (`logits_to_keep`).
- `data.padding_free` runs each batch as one row of its examples side by side.
Both must leave the optimization unchanged: same loss, same gradients (fp32).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.stages import load_config
from posttrain.data.collate import collate_padded, collate_padding_free
from posttrain.data.render import Tokenized
from posttrain.losses.sft import IGNORE_INDEX, token_nll
from posttrain.models.adapters import apply as apply_adapter
from posttrain.stages.sft import LMStage

LENGTHS = [23, 9, 17, 5, 30, 12]


def examples(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 2  # the first half is prompt: no loss there
        out.append(Tokenized(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"row {i}"))
    return out


def plain_loss(model, batch):
    """The reference: full logits at every position, then token_nll."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return token_nll(out.logits, batch["labels"])[0]


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert abs(la - lb) <= rtol * abs(la), (la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    worst = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    scale = max(float(ga[k].abs().max()) for k in ga)
    assert worst <= atol + rtol * scale, f"max |grad diff| {worst:.2e} (grad scale {scale:.2e})"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_head_at_labelled_positions_and_padding_free_match_the_plain_path(arch, tiny_models, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32)
    exs = examples(len(tokenizer))
    padded = collate_padded(exs, pad_id=0)
    stage = LMStage("sft")
    ref = loss_and_grads(model, lambda: plain_loss(model, padded))
    assert_same(ref, loss_and_grads(model, lambda: stage.loss(model, padded)[0]))
    free = collate_padding_free(exs, pad_id=0)
    assert free["input_ids"].shape == (1, sum(LENGTHS))  # no padding token at all
    assert stage.num_loss_units(free) == stage.num_loss_units(padded) == sum(n - n // 2 for n in LENGTHS)
    assert_same(ref, loss_and_grads(model, lambda: stage.loss(model, free)[0]))


def test_padding_free_with_lora_matches_padded(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"), dtype=torch.float32)
    cfg = load_config("sft", overrides=["adapter.type=lora", "adapter.r=8", "adapter.targets=all-linear"])
    torch.manual_seed(0)
    model = apply_adapter(model, cfg.adapter, tokenizer=tokenizer)
    with torch.no_grad():  # a trained-looking adapter, so B's gradient is not the only nonzero one
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    exs = examples(len(tokenizer), seed=1)
    stage = LMStage("sft")
    ref = loss_and_grads(model, lambda: plain_loss(model, collate_padded(exs, pad_id=0)))
    got = loss_and_grads(model, lambda: stage.loss(model, collate_padding_free(exs, pad_id=0))[0])
    assert all("lora_" in k for k in got[1])
    assert_same(ref, got)


def test_padding_free_config_errors():
    with pytest.raises(ValueError, match="data.padding_free and data.packing both set"):
        load_config("sft", overrides=["data.padding_free=true", "data.packing=true"])
    with pytest.raises(ValueError, match="data.padding_free does not work with adapter.type=prompt"):
        load_config("sft", overrides=["data.padding_free=true", "adapter.type=prompt"])
    assert load_config("sft", overrides=["data.padding_free=true"]).data.padding_free is True
