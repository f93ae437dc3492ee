"""build_dataset end to end: splits, mixing, packing, stats and hashes, from a DataConfig."""

import hashlib
import json
import time

import pytest

from posttrain.config import DataConfig, MixConfig
from posttrain.data import DataError, build_dataset
from posttrain.data.packing import pack_bfd, packing_efficiency
from posttrain.models.tiny import CHATML_TEMPLATE, build_tokenizer


def chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + 3?"},
                         {"role": "assistant", "content": f"The answer is {i + 3}."}]}


@pytest.fixture
def files(tmp_path):
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(40)))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"The quick brown fox {i}."}) + "\n" for i in range(5)))
    return domain, general


def test_eval_split_is_deterministic_and_disjoint(files):
    tok = build_tokenizer()
    cfg = DataConfig(train=str(files[0]), eval_fraction=0.25, max_length=64)
    a = build_dataset(cfg, tok, stage="sft", seed=1)
    b = build_dataset(cfg, tok, stage="sft", seed=1)
    assert len(a.train) == 30 and len(a.eval) == 10
    assert [x.origin for x in a.eval] == [x.origin for x in b.eval]
    assert not {x.origin for x in a.train} & {x.origin for x in a.eval}
    assert a.hashes == {str(files[0]): hashlib.sha256(files[0].read_bytes()).hexdigest()}
    batch = a.collate(a.train[:4])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4


def test_mix_reaches_the_ratio_and_reports_replacement(files):
    tok = build_tokenizer()
    cfg = DataConfig(train=str(files[0]), max_length=64, mix=MixConfig(data=str(files[1]), ratio=0.2))
    bundle = build_dataset(cfg, tok, stage="sft", seed=0)
    general = [x for x in bundle.train if "general.jsonl" in x.origin]
    assert len(general) == 10 and len(bundle.train) == 50  # 10 / 50 = 0.2
    assert bundle.stats["mix_with_replacement"] is True and bundle.stats["mix_general_available"] == 5
    assert set(bundle.hashes) == {str(files[0]), str(files[1])}


def test_packed_sft_reports_efficiency_and_collates_rows(files):
    tok = build_tokenizer()
    cfg = DataConfig(train=str(files[0]), max_length=128, packing=True)
    bundle = build_dataset(cfg, tok, stage="sft")
    n_tokens = sum(len(x) for row in bundle.train for x in row)
    assert bundle.packed and bundle.stats["packed_rows"] == len(bundle.train)
    assert bundle.stats["packing_efficiency"] == round(n_tokens / (128 * len(bundle.train)), 4)
    assert bundle.stats["packing_efficiency"] > 0.9
    batch = bundle.collate(bundle.train[:2])
    assert batch["attention_mask"].shape == (2, 1, 128, 128) and batch["position_ids"].shape == (2, 128)


def test_cpt_is_packed_splits_long_text_and_rejects_chat(files, tmp_path):
    tok = build_tokenizer()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15. " * 8}) + "\n")
    bundle = build_dataset(DataConfig(train=str(long), max_length=32), tok, stage="cpt")
    assert bundle.packed and bundle.stats["split_into_chunks"] == 1 and bundle.stats["truncated"] == 0
    with pytest.raises(DataError, match=r"domain.jsonl line 1: continued pretraining \(cpt\) trains on raw text"):
        build_dataset(DataConfig(train=str(files[0])), tok, stage="cpt")


def test_gym_sources_and_tool_calls():
    from posttrain.gym import load_task_rows
    from posttrain.gym.chat_template import CHAT_TEMPLATE

    tok = build_tokenizer(chat_template=CHAT_TEMPLATE)
    cfg = DataConfig(train="gym:tools", eval="gym:tools:test", max_length=512, limit=50)
    bundle = build_dataset(cfg, tok, stage="sft")
    assert bundle.train[0].origin == "gym:tools:train row 0" and bundle.eval[0].origin == "gym:tools:test row 0"
    assert len(bundle.train) == 50 and len(bundle.eval) == len(load_task_rows("tools", "test"))
    assert set(bundle.hashes) == {"gym:tools", "gym:tools:test"}
    rows = load_task_rows("tools", "train")[:50]
    k = next(i for i, r in enumerate(rows) if r["call"] is not None)
    item = bundle.train[k]
    trained = tok.decode([i for i, lab in zip(item.input_ids, item.labels) if lab != -100])
    # the call JSON itself is what the model learns to write, then the end of turn
    assert trained.startswith('<tool_call>{"name": "' + rows[k]["call"]["name"]) and trained.endswith("<|im_end|>")
    with pytest.raises(DataError, match="unknown gym task 'tool'; did you mean 'tools'"):
        build_dataset(DataConfig(train="gym:tool"), tok, stage="sft")


def test_template_that_drops_tool_calls_is_an_error():
    from posttrain.data import Record, to_example, tokenize_example

    # a template that lists tools but writes only each message's `content` (a template without any
    # tool support gets the documented fallback format instead: tests/data/test_tool_render.py)
    tok = build_tokenizer(chat_template="{% if tools %}{{ tools | length }} tools\n{% endif %}" + CHATML_TEMPLATE)
    row = {"messages": [{"role": "user", "content": "Timer 5"},
                        {"role": "assistant", "tool_calls": [{"name": "set_timer", "arguments": {"minutes": 5}}]}]}
    with pytest.raises(DataError, match=r"^row 0: messages\[1\].tool_calls are not written by the chat template"):
        tokenize_example(to_example(Record(row, "row 0")), tok, max_length=64)


def test_truncation_counts_are_reported(files):
    tok = build_tokenizer()
    bundle = build_dataset(DataConfig(train=str(files[0]), max_length=18), tok, stage="sft")
    s = bundle.stats
    # prompts are 17-18 tokens: the 18-token ones keep no answer token and are dropped
    assert s["truncated"] == 40 and s["dropped_no_loss"] > 0 and s["examples"] == 40
    assert len(bundle.train) == 40 - s["dropped_no_loss"]
    with pytest.raises(DataError, match="no training examples left"):
        build_dataset(DataConfig(train=str(files[0]), max_length=4, overflow="drop"), tok, stage="sft")


def test_pack_bfd_best_fit():
    rows = pack_bfd([5, 4, 3, 3, 2, 2, 1], 8)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert [sum([5, 4, 3, 3, 2, 2, 1][i] for i in r) for r in rows] == [8, 8, 4]
    assert packing_efficiency([5, 4, 3, 3, 2, 2, 1], rows, 8) == 20 / 24
    with pytest.raises(ValueError, match="length 9 > row capacity 8"):
        pack_bfd([9], 8)


def test_tokenizing_10k_chats_takes_seconds(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(10_000)))
    tok = build_tokenizer()
    t0 = time.perf_counter()
    bundle = build_dataset(DataConfig(train=str(p), max_length=64, packing=True), tok, stage="sft")
    dt = time.perf_counter() - t0
    print(f"10k chats read+validate+render+mask+pack: {dt:.2f}s")
    assert bundle.stats["examples"] == 10_000
    assert dt < 60  # 2-3 s measured on 2 shared cores; the bound catches a quadratic slip, not noise
