"""Gym generators: determinism, disjoint splits, standard formats, JSONL export."""

import json

import pytest

from posttrain import gym
from posttrain.gym.facts import split_of


@pytest.mark.parametrize("task", gym.TASKS)
def test_same_seed_same_rows_and_other_seed_other_rows(task):
    a = gym.load_task_rows(task, "validation", n=50, seed=3)
    assert a == gym.load_task_rows(task, "validation", n=50, seed=3)
    assert a != gym.load_task_rows(task, "validation", n=50, seed=4)
    assert len(a) == 50


def _prompt_text(task, row):
    if task == "regression":
        return row["prompt"]
    if task == "preference":
        return row["prompt"][0]["content"]
    if task == "lookup":  # the question is about the asker's own country, the environment's hidden state
        return (row["country"], row["messages"][0]["content"])
    return row["messages"][0]["content"]


@pytest.mark.parametrize("task", gym.TASKS)
def test_splits_are_disjoint(task):
    splits = {s: {_prompt_text(task, r) for r in gym.load_task_rows(task, s, n=300 if s == "train" else 100)}
              for s in gym.SPLITS}
    assert not splits["train"] & splits["test"]
    assert not splits["train"] & splits["validation"]
    assert not splits["validation"] & splits["test"]


def test_split_is_a_function_of_the_fact_not_the_wording():
    # the same fact asked in different words must land in one split: held-out means held-out facts
    rows = gym.load_task_rows("instruct", "test", n=200)
    train_q = {r["messages"][0]["content"] for r in gym.load_task_rows("instruct", "train", n=2000)}
    test_caps = {r["answer"] for r in rows if r["kind"] == "capital"}
    train_caps = {r["messages"][1]["content"] for r in gym.load_task_rows("instruct", "train", n=2000)
                  if r["kind"] == "capital"}
    assert test_caps and not test_caps & train_caps
    assert not {r["messages"][0]["content"] for r in rows} & train_q
    assert split_of("capital:Goumos") == split_of("capital:Goumos")
    fractions = [split_of(f"add:{a}:{b}") for a in range(100) for b in range(100)]
    assert 0.77 < fractions.count("train") / len(fractions) < 0.83


def test_row_formats():
    ins = gym.load_task_rows("instruct", "train", n=20)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in ins)
    pref = gym.load_task_rows("preference", "train", n=20)
    assert all(set(r) >= {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in pref)
    ref = gym.load_task_rows("refusal", "train", n=200)
    harmful = [r["harmful"] for r in ref]
    assert 0.35 < sum(harmful) / len(harmful) < 0.65
    tl = gym.load_task_rows("tools", "train", n=200)
    with_call = [r for r in tl if r["call"] is not None]
    assert 0.5 < len(with_call) / len(tl) < 0.9
    for r in with_call:
        fn = r["messages"][1]["tool_calls"][0]["function"]
        assert fn == r["call"] and fn["name"] in {t["function"]["name"] for t in r["tools"]}
    reg = gym.load_task_rows("regression", "test", n=20)
    assert all(set(r) >= {"prompt", "completion"} and r["completion"].startswith(" ") for r in reg)


def test_export_writes_jsonl(tmp_path):
    out = gym.export("preference", "test", tmp_path / "p.jsonl", n=30)
    lines = out.read_text().splitlines()
    assert len(lines) == 30
    assert [json.loads(x) for x in lines] == gym.load_task_rows("preference", "test", n=30)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="did you mean 'instruct'"):
        gym.load_task_rows("instrct", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        gym.load_task_rows("instruct", "dev")
