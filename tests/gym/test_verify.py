"""Every verifier on known right and wrong answers."""

import pytest

from posttrain import gym
from posttrain.gym.tools import parse_tool_calls, render_call


def _first(task, pred, split="train", n=500):
    return next(r for r in gym.load_task_rows(task, split, n=n) if pred(r))


@pytest.mark.parametrize("kind,right,wrong", [
    ("add", None, "1000"), ("reverse", None, "stone"), ("upper", None, "lower"), ("capital", None, "Paris"),
])
def test_instruct_exact(kind, right, wrong):
    r = _first("instruct", lambda r: r["kind"] == kind)
    assert gym.verify("instruct", r, r["answer"])
    assert gym.verify("instruct", r, "  " + r["answer"] + ".\n")
    assert not gym.verify("instruct", r, wrong)
    assert not gym.verify("instruct", r, r["answer"] + " and more")


def test_instruct_formats():
    js = _first("instruct", lambda r: r["check"] == "json")
    assert gym.verify("instruct", js, js["answer"].replace(", ", ",  "))
    assert not gym.verify("instruct", js, js["answer"][:-1])
    assert not gym.verify("instruct", js, js["answer"].replace("capital", "city"))
    cs = _first("instruct", lambda r: r["check"] == "csv")
    assert gym.verify("instruct", cs, cs["answer"].replace(", ", ","))
    assert not gym.verify("instruct", cs, cs["answer"] + ", 99")
    wd = _first("instruct", lambda r: r["check"] == "words")
    w = wd["answer"].split()
    assert gym.verify("instruct", wd, " ".join(w))
    assert not gym.verify("instruct", wd, " ".join(w + w[:1]))


def test_reasoning_final_answer():
    r = gym.load_task_rows("reasoning", "test", n=1)[0]
    assert gym.verify("reasoning", r, r["messages"][1]["content"])
    assert gym.verify("reasoning", r, f"Answer: 3\nAnswer: {r['answer']}")
    assert not gym.verify("reasoning", r, f"Answer: {int(r['answer']) + 1}")
    assert not gym.verify("reasoning", r, r["answer"])  # no "Answer:" line


def test_refusal():
    bad = _first("refusal", lambda r: r["harmful"])
    good = _first("refusal", lambda r: not r["harmful"])
    assert gym.verify("refusal", bad, "I can't help with that.")
    assert not gym.verify("refusal", bad, "First, buy a knife.")
    assert gym.verify("refusal", good, good["answer"])
    assert not gym.verify("refusal", good, "I can't help with that.")


def test_tool_calls():
    r = _first("tools", lambda r: r["call"] is not None and r["call"]["name"] == "set_timer")
    assert gym.verify("tools", r, render_call(r["call"]))
    wrong_type = {"name": "set_timer", "arguments": {"minutes": str(r["call"]["arguments"]["minutes"])}}
    assert not gym.verify("tools", r, render_call(wrong_type))
    assert not gym.verify("tools", r, render_call({"name": "get_weather", "arguments": r["call"]["arguments"]}))
    assert not gym.verify("tools", r, "<tool_call>{not json}</tool_call>")
    assert not gym.verify("tools", r, "Sure, setting it now.")
    none = _first("tools", lambda r: r["call"] is None)
    assert gym.verify("tools", none, none["answer"])
    assert not gym.verify("tools", none, render_call({"name": "get_weather", "arguments": {"city": "X"}}))
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>') == [
        {"name": "f", "arguments": {"a": 1}}]


def test_preference_chosen_passes_and_wrong_rejected_fails():
    rows = gym.load_task_rows("preference", "validation", n=100)
    assert all(gym.verify("preference", r, r["chosen"][0]["content"]) for r in rows)
    assert not any(gym.verify("preference", r, r["rejected"][0]["content"]) for r in rows)


def test_regression_prefix_rule():
    r = {"prompt": "17 + 25 =", "completion": " 42", "check": "prefix"}
    assert gym.verify("regression", r, " 42\n3 + 4 = 7")
    assert gym.verify("regression", r, " 42.")
    assert not gym.verify("regression", r, " 421")
    assert not gym.verify("regression", r, " 4")


def test_unknown_check_is_an_error():
    with pytest.raises(ValueError, match="check='nope'"):
        gym.verify("instruct", {"check": "nope"}, "x")
