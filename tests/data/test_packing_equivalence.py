"""Packed rows give exactly the per-example logits, for every supported architecture.

transformers' sdpa/eager attention ignore packed position_ids without a mask, so a naive packed
forward attends across examples; the 4-D block-diagonal mask from collate_packed prevents that.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.collate import additive_mask, collate_packed, model_attention_mask
from posttrain.data.packing import pack_bfd
from posttrain.data.render import Tokenized

LENGTHS = [23, 9, 17, 5, 30]
ROW_LEN = 48


def examples(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Tokenized(torch.randint(3, vocab, (n,), generator=g).tolist(), [0] * n, f"row {i}")
            for i, n in enumerate(LENGTHS)]


def packed_vs_single(model, exs, mode):
    rows = [[exs[i] for i in r] for r in pack_bfd([len(e) for e in exs], ROW_LEN)]
    batch = collate_packed(rows, pad_id=0, row_len=ROW_LEN)
    mask = batch["attention_mask"]
    kw = {"position_ids": batch["position_ids"]}
    if mode == "bool":
        kw["attention_mask"] = mask
    elif mode == "additive":
        kw["attention_mask"] = additive_mask(mask, torch.float32)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], **kw).logits
        worst = 0.0
        for b, row in enumerate(rows):
            s = 0
            for ex in row:
                n = len(ex)
                alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
                worst = max(worst, (packed[b, s:s + n] - alone).abs().max().item())
                s += n
    assert torch.isfinite(packed).all()  # padding rows attend to themselves: no NaN
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_example_logits(arch, attn, tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32, attn_implementation=attn).eval()
    exs = examples(len(tokenizer))
    # eager adds the mask to the scores, so it needs the additive float form
    diff = packed_vs_single(model, exs, "bool" if attn == "sdpa" else "additive")
    print(f"{arch}/{attn}: packed vs single max|diff| = {diff:.2e}")
    assert diff < 1e-4
    # the contamination the mask prevents
    assert packed_vs_single(model, exs, "none") > 1e-2
    if attn == "eager":  # eager adds a bool mask to the scores as 1.0: it does not mask at all
        assert packed_vs_single(model, exs, "bool") > 1e-2
        assert model_attention_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), model).dtype == torch.float32


def test_collate_packed_layout():
    a = Tokenized([5, 6, 7], [-100, 6, 7], "a")
    b = Tokenized([8, 9], [8, 9], "b")
    batch = collate_packed([[a, b]], pad_id=0, row_len=7)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    # b's first token is not a target of a's last token; padding is never a target
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    m = batch["attention_mask"][0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]


def test_packed_and_padded_batches_give_the_same_sft_loss(tiny_models, tokenizer, tmp_path):
    import json

    from posttrain.config import DataConfig
    from posttrain.data import build_dataset
    from posttrain.data.collate import model_attention_mask
    from posttrain.losses.sft import token_nll

    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 3?"},
                          {"role": "assistant", "content": f"The answer is {i + 3}."}]} for i in range(12)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"), dtype=torch.float32).eval()
    totals = {}
    for packing in (False, True):
        b = build_dataset(DataConfig(train=str(p), max_length=96, packing=packing), tokenizer, stage="sft")
        batch = b.collate(b.train)
        kw = {"position_ids": batch["position_ids"]} if packing else {}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=model_attention_mask(batch["attention_mask"], model) if packing
                           else batch["attention_mask"], **kw).logits
        totals[packing] = token_nll(logits, batch["labels"])
    assert totals[True][1] == totals[False][1]  # same trained tokens: no cross-example targets
    assert abs(totals[True][0].item() - totals[False][0].item()) < 1e-3


def test_collate_padded_layout():
    from posttrain.data.collate import collate_padded

    a = Tokenized([5, 6, 7], [-100, 6, 7], "a")
    b = Tokenized([8], [8], "b")
    batch = collate_padded([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
