"""The bundled base model: loads like any checkpoint, is small, knows the skills in plain text,
and does not follow chat instructions before SFT."""

import json

import pytest
import torch

import posttrain
from posttrain import gym
from posttrain.gym.chat_template import tool_listing


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return posttrain.load(gym.base_model_path())


def test_bundled_files_and_size():
    p = gym.base_model_path()
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    assert size <= 15 * 2**20, f"bundled model is {size / 2**20:.1f} MiB"
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    log = json.loads((p / "pretrain_log.json").read_text())
    assert log["seed"] == 0 and log["final_loss_ema"] < 1.0


def test_tokenizer_chatml_and_tools(base):
    _, tok = base
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("<|im_start|>user\n12<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"]) == ["1", "2", "3"]
    row = next(r for r in gym.load_task_rows("tools", "test", n=50) if r["call"])
    text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert tool_listing(row["tools"]) in text
    assert gym.tools.render_call(row["call"]) + "<|im_end|>" in text


def test_continues_plain_text_arithmetic(base):
    model, tok = base
    outs = gym.greedy_complete(model, tok, ["7 + 5 =", "The capital of Goumos is", "The word stone reversed is"],
                               max_new_tokens=6)
    assert outs[0].startswith(" 12"), outs
    assert outs[1].startswith(" Pomsom"), outs
    assert outs[2].startswith(" enots"), outs


def test_base_is_good_at_plain_text_skills(base):
    # measured at bundling time: 0.835 (see docs/gym.md)
    assert gym.regression_score(*base, n=200) >= 0.80


def test_base_does_not_follow_chat_instructions(base):
    # measured at bundling time: 0.000; a base model continues the chat with another document
    assert gym.task_accuracy(*base, task="instruct", n=200) < 0.10
