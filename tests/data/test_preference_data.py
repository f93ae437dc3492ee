"""Preference data: formats, implicit prompts, masks, per-row errors, paired -> unpaired."""

import json

import pytest
import torch

from posttrain.data import DataError, read_records
from posttrain.data.preference import (
    completion_start, mismatched, to_preference_examples, tokenize_pairs, tokenize_unpaired,
)
from posttrain.losses.sft import sequence_logps

U = {"role": "user", "content": "What is 2 + 3?"}
SYS = {"role": "system", "content": "Be brief."}


def _a(text):
    return {"role": "assistant", "content": text}


def _write(tmp_path, rows, name="prefs.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _pairs(rows, tokenizer, kind="paired"):
    ex = to_preference_examples(read_records(rows), kind)
    return ex, (tokenize_pairs if kind == "paired" else tokenize_unpaired)(ex, tokenizer, max_length=256)


def test_conversational_pair_masks_only_the_completions(tokenizer):
    _, [p] = _pairs([{"prompt": [U], "chosen": [_a("5")], "rejected": [_a("The answer is 6.")]}], tokenizer)
    for side, text in ((p.chosen, "5"), (p.rejected, "The answer is 6.")):
        k = completion_start(side)
        trained = tokenizer.decode([i for i, lab in zip(side.input_ids, side.labels) if lab != -100])
        assert trained == text + "<|im_end|>"
        assert all(lab == -100 for lab in side.labels[:k])
    # both sides share the same prompt tokens (chat header of the answer included)
    k = completion_start(p.chosen)
    assert p.chosen.input_ids[:k] == p.rejected.input_ids[:k]
    assert tokenizer.decode(p.chosen.input_ids[:k]).endswith("<|im_start|>assistant\n")


def test_missing_prompt_takes_the_shared_message_prefix(tokenizer):
    explicit = {"prompt": [SYS, U], "chosen": [_a("5")], "rejected": [_a("6")]}
    implicit = {"chosen": [SYS, U, _a("5")], "rejected": [SYS, U, _a("6")]}
    _, [a] = _pairs([explicit], tokenizer)
    _, [b] = _pairs([implicit], tokenizer)
    assert (a.chosen.input_ids, a.chosen.labels) == (b.chosen.input_ids, b.chosen.labels)
    assert (a.rejected.input_ids, a.rejected.labels) == (b.rejected.input_ids, b.rejected.labels)


def test_plain_text_pairs_and_completion_only_logps(tokenizer, tiny_models):
    _, [p] = _pairs([{"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6 or so"}], tokenizer)
    prompt_len = len(tokenizer("Q: 2+3=")["input_ids"])
    assert p.chosen.input_ids[:prompt_len] == p.rejected.input_ids[:prompt_len]
    assert completion_start(p.chosen) == prompt_len
    n_c = len(tokenizer(" 5", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert p.chosen.num_loss_tokens == n_c
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    ids = torch.tensor([p.chosen.input_ids])
    logits = model(ids).logits
    lp, n = sequence_logps(logits, torch.tensor([p.chosen.labels]))
    # by hand: sum over completion positions only
    logprobs = torch.log_softmax(logits[0, :-1], -1)
    manual = sum(float(logprobs[t - 1, ids[0, t]].detach()) for t in range(prompt_len, ids.shape[1]))
    assert int(n) == n_c and float(lp) == pytest.approx(manual, abs=1e-4)


@pytest.mark.parametrize("row, message", [
    ({"prompt": [U], "chosen": [_a("5")]}, "line 2: missing field 'rejected'"),
    ({"prompt": [U], "chosen": [{"role": "bot", "content": "5"}], "rejected": [_a("6")]},
     "line 2: chosen[0].role must be one of system/user/assistant/tool, got 'bot'"),
    ({"prompt": [U], "chosen": [_a("5")], "rejected": [_a("")]}, "line 2: rejected[0].content is empty"),
    ({"chosen": [U, _a("5")], "rejected": [{"role": "user", "content": "hi"}, _a("6")]},
     "line 2: missing field 'prompt', and chosen and rejected share no leading message"),
    ({"chosen": "5", "rejected": "6"}, "line 2: missing field 'prompt'; without it chosen must be a whole conversation"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "line 2: rejected must be a string when prompt is a string, got int"),
    ({"prompt": "q", "completion": "a", "label": True}, "line 2: unpaired row (prompt, completion, label) but this stage"),
    ({"text": "hello"}, "line 2: not preference data"),
])
def test_errors_name_file_line_and_field(tmp_path, row, message):
    good = {"prompt": [U], "chosen": [_a("5")], "rejected": [_a("6")]}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError) as e:
        to_preference_examples(read_records(path), "paired")
    assert str(e.value).startswith(f"{path} line 2:") and message in str(e.value)


def test_unpaired_format_and_label_validation(tmp_path, tokenizer):
    rows = [{"prompt": [U], "completion": [_a("5")], "label": True},
            {"prompt": "Q", "completion": "A", "label": "false"}]
    ex, toks = _pairs(rows, tokenizer, kind="unpaired")
    assert [t.label for t in toks] == [True, False]
    path = _write(tmp_path, rows[:1] + [{"prompt": "Q", "completion": "A", "label": 0.5}])
    with pytest.raises(DataError, match=r"line 2: label must be a bool \(true = desirable\), got 0.5"):
        to_preference_examples(read_records(path), "unpaired")
    path = _write(tmp_path, [{"prompt": "Q", "completion": "A"}], "b.jsonl")
    with pytest.raises(DataError, match="line 1: missing field 'label'"):
        to_preference_examples(read_records(path), "unpaired")


def test_paired_converts_to_unpaired_for_kto(tokenizer):
    rows = [{"prompt": [U], "chosen": [_a("5")], "rejected": [_a("6")]},
            {"prompt": [U], "chosen": [_a("five")], "rejected": [_a("six")]}]
    ex, toks = _pairs(rows, tokenizer, kind="unpaired")
    assert [t.label for t in toks] == [True, False, True, False]
    assert toks[0].origin == "row 0 (chosen)" and toks[3].origin == "row 1 (rejected)"
    _, pairs = _pairs(rows, tokenizer)
    assert toks[1].item.input_ids == pairs[0].rejected.input_ids


def test_mismatched_row_joins_one_prompt_with_another_completion(tokenizer):
    rows = [{"prompt": [U], "completion": [_a("5")], "label": True},
            {"prompt": [{"role": "user", "content": "Spell cat"}], "completion": [_a("c a t")], "label": False}]
    _, (x, y) = _pairs(rows, tokenizer, kind="unpaired")
    m = mismatched(x.item, y.item, max_length=256)
    text = tokenizer.decode(m.input_ids)
    assert "What is 2 + 3?" in text and "c a t" in text and "Spell cat" not in text
    assert m.num_loss_tokens == y.item.num_loss_tokens


def test_pair_dropped_when_a_side_overflows(tokenizer):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "word " * 200}, {"prompt": "Q", "chosen": "A", "rejected": "B"}]
    ex = to_preference_examples(read_records(rows), "paired")
    stats = {}
    out = tokenize_pairs(ex, tokenizer, max_length=32, overflow="drop", stats=stats)
    assert len(out) == 1 and out[0].origin == "row 1" and stats["dropped_pairs"] == 1


def test_tied_pairs_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": [U], "chosen": [_a("5")], "rejected": [_a("6")]},
            {"prompt": [U], "chosen": [_a("0")], "rejected": [_a("0")]}]
    stats = {}
    path = _write(tmp_path, rows)
    out = to_preference_examples(read_records(path), "paired", stats)
    assert len(out) == 1 and stats["dropped_tied_pairs"] == 1
    assert f"{path} line 2" in caplog.text
