"""gym:lookup: hidden counts only the lookup tool returns, a safe calculator, SFT traces, the environment."""

import re

import pytest

from posttrain import gym
from posttrain.gym.lookup import (FIELDS, LookupEnv, calculate, expression_parts, lookup, parts_right, records,
                                  run_tool)


def test_calculator_walks_the_syntax_tree_only():
    assert [calculate(e) for e in ("3 + 4", "15 - 9", "(2 + 3) * 4", "7 / 2", "-3 + 10")] == ["7", "6", "20", "3.5", "7"]
    for bad, msg in (("__import__('os')", "unsupported expression element Call"), ("2 +", "cannot parse '2 +'"),
                     ("1 / 0", "division by zero"), ("2 ** 99", "unsupported expression element BinOp")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            calculate(bad)


def test_lookup_returns_counts_that_the_corpus_never_states():
    recs = records()
    assert len(recs) == 100 and all(2 <= r[f] <= 15 for r in recs.values() for f in FIELDS)
    name = next(iter(recs))
    assert [lookup(name, f) for f in FIELDS] == [str(recs[name][f]) for f in FIELDS]
    assert run_tool("lookup", {"item": "lakes"}, name) == (str(recs[name]["lakes"]), False)
    assert run_tool("lookup", {"item": "lakes"}, "Atlantis") == ("error: unknown country 'Atlantis'", True)
    assert run_tool("lookup", {"item": "dams"}, name) == ("error: unknown item 'dams' (items: lakes, towers, bridges)",
                                                          True)
    assert run_tool("lookup", {}, name) == ("error: lookup needs the argument 'item'", True)
    assert run_tool("calculator", {"expression": "11 - 10"}, name) == ("11 - 10 = 1", False)
    assert run_tool("calculator", {}, name) == ("error: calculator needs the argument 'expression'", True)
    from posttrain.gym.corpus import __file__ as corpus_file  # the corpus generator never reads these counts
    assert "lookup" not in open(corpus_file).read()


def test_rows_are_worked_traces_whose_answers_follow_from_the_tool_results():
    rows = gym.load_task_rows("lookup", "train", n=200)
    test = gym.load_task_rows("lookup", "test", n=200)
    # the asker's country is the hidden state: a test (country, question) pair is never a training one,
    # and the same question asked from another country has its own answer
    pairs = {(r["country"], r["messages"][0]["content"]) for r in rows}
    assert not pairs & {(r["country"], r["messages"][0]["content"]) for r in test}
    assert not any(r["country"] in r["messages"][0]["content"] for r in rows)
    for r in rows:
        msgs = r["messages"]
        looked = [m["tool_calls"][0]["function"]["arguments"]["item"] for m in msgs[1:-3:2]]
        assert [m["content"] for m in msgs[2:-3:2]] == [lookup(r["country"], item) for item in looked]
        assert [m["role"] for m in msgs][-3:] == ["assistant", "tool", "assistant"] and len(msgs) in (6, 8)
        calc = msgs[-3]["tool_calls"][0]["function"]
        assert calc["name"] == "calculator" and calculate(calc["arguments"]["expression"]) == r["answer"]
        assert msgs[-1]["content"] == f"Answer: {r['answer']}" and gym.verify("lookup", r, msgs[-1]["content"])
        assert int(r["answer"]) >= 0


def test_environment_plays_the_trace_and_rewards_the_final_answer():
    row = gym.load_task_rows("lookup", "validation", n=1)[0]
    env = LookupEnv()
    msgs = env.reset(row)
    assert msgs == row["messages"][:1]
    for i in range(1, len(row["messages"]) - 1, 2):
        new, reward, done = env.step(msgs, row["messages"][i])
        assert (new, reward, done) == ([row["messages"][i + 1]], 0.0, False)
        msgs = msgs + [row["messages"][i]] + new
    assert env.step(msgs, row["messages"][-1]) == ([], 1.0, True)
    assert env.step(msgs, {"role": "assistant", "content": "Answer: 999"}) == ([], 0.0, True)


def test_lookup_credit_rewards_each_named_item_once():
    row = next(r for r in gym.load_task_rows("lookup", "validation", n=20) if len(r["messages"]) == 8)
    env = LookupEnv(lookup_credit=0.25)
    msgs = env.reset(row)
    first, second = row["messages"][1], row["messages"][3]
    assert env.step(msgs, first)[1] == 0.25 and env.step(msgs, first)[1] == 0.0  # once per item
    assert env.step(msgs, second)[1] == 0.25
    wrong = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"item": "dams"}}}]}
    assert env.step(msgs, wrong)[1] == 0.0
    assert LookupEnv().step(env.reset(row), first)[1] == 0.0  # no shaping by default


def test_expression_credit_rewards_the_parts_of_the_first_calculation():
    assert [parts_right(e, "12 - 9") for e in ("12 - 9", "12 + 9", "12 + 12", "9 - 12", "12-9", "twelve", "")] == \
        [3, 2, 1, 1, 3, 0, 0]
    assert parts_right("9 + 12", "12 + 9") == 3 and parts_right("12 + 9", "x") == 0
    row = next(r for r in gym.load_task_rows("lookup", "validation", n=20) if len(r["messages"]) == 6)
    calc = row["messages"][3]
    gold = calc["tool_calls"][0]["function"]["arguments"]["expression"]
    a, op, b = expression_parts(gold)
    wrong_sign = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": f"{a} {'+' if op == '-' else '-'} {b}"}}}]}
    env = LookupEnv(expression_credit=0.3)
    msgs = env.reset(row)
    assert env.step(msgs, row["messages"][1])[1] == 0.0              # the lookup earns nothing
    assert env.step(msgs, wrong_sign)[1] == pytest.approx(0.2)       # two of three parts
    assert env.step(msgs, calc)[1] == 0.0                            # only the first calculation counts
    env = LookupEnv(expression_credit=0.3)
    msgs = env.reset(row)
    assert env.step(msgs, calc)[1] == pytest.approx(0.3) and env.step(msgs, row["messages"][-1])[1] == 1.0
    assert LookupEnv().step(LookupEnv().reset(row), calc)[1] == 0.0  # no shaping by default
