"""Scorers on known outputs: every number below is worked out by hand."""

import math

import pytest

from posttrain.eval import ifeval, stats
from posttrain.eval.kinds import (score_generate, score_ifeval, score_multiple_choice, score_refusal, score_tool_call,
                                  summarize)
from posttrain.data.refusal import is_refusal
from posttrain.eval.tasks import Task, TaskError, make_task


def task(kind, **kw):
    return Task(name="t", kind=kind, rows=[], **kw)


def test_binomial_and_mean_standard_errors():
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)
    m = stats.metric([1, 0, 1, 1])
    assert m["value"] == 0.75 and m["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    # non-binary values: sample SE with n-1
    assert stats.mean_se([1.0, 2.0, 3.0]) == pytest.approx(1.0 / math.sqrt(3))


def test_paired_difference_se_is_smaller_than_unpaired_for_correlated_items():
    base = [1, 1, 1, 0, 0, 0, 1, 0]
    tuned = [1, 1, 1, 0, 0, 0, 0, 0]  # one item flipped
    se, paired = stats.diff_se(base, tuned, stats.mean_se(base), stats.mean_se(tuned))
    d = [-0.0] * 6 + [-1.0, 0.0]
    m = sum(d) / 8
    want = math.sqrt(sum((x - m) ** 2 for x in d) / 7 / 8)
    assert paired and se == pytest.approx(want)
    assert se < math.sqrt(stats.mean_se(base) ** 2 + stats.mean_se(tuned) ** 2)
    se_u, paired_u = stats.diff_se(base, tuned[:4], 0.1, 0.2)
    assert not paired_u and se_u == pytest.approx(math.sqrt(0.05))


def test_multiple_choice_acc_and_length_normalized_acc_norm():
    rows = [{"choices": [" a", " much longer answer"], "label": 1},
            {"choices": [" x", " y", " z"], "label": 2}]
    # row 1: raw argmax is choice 0 (-2 > -6), per character -2/2=-1 < -6/19: acc_norm picks 1
    # row 2: argmax is 2 either way (same lengths)
    items = score_multiple_choice(task("multiple_choice"), rows, [[-2.0, -6.0], [-3.0, -2.0, -1.0]])
    assert items == {"acc": [0.0, 1.0], "acc_norm": [1.0, 1.0]}


def test_generate_exact_regex_and_verifier():
    rows = [{"answer": "42"}, {"answer": ["7", "seven"]}, {"answer": "9"}]
    outs = [" 42\n", "seven", "The answer is 9"]
    assert score_generate(task("generate"), rows, outs)["exact_match"] == [1.0, 1.0, 0.0]
    rx = task("generate", scorer="regex", pattern=r"(\d+)")
    assert score_generate(rx, rows, outs)["exact_match"] == [1.0, 0.0, 1.0]
    ver = task("generate", scorer="verifier", verifier="posttrain.eval.suites:gym_verify")
    gym_rows = [{"answer": "PEN", "check": "exact"}, {"answer": "1, 2, 3", "check": "csv"}]
    assert score_generate(ver, gym_rows, ["PEN.", "1,2,3"])["accuracy"] == [1.0, 1.0]
    assert ver.primary == "accuracy"


def test_ifeval_instruction_checks():
    c = ifeval.check_instruction
    assert c("one two three", {"type": "length_words", "relation": "at most", "num": 3})
    assert not c("one two three four", {"type": "length_words", "relation": "at most", "num": 3})
    assert c("Hi there. How are you? Fine!", {"type": "length_sentences", "relation": "exactly", "num": 3})
    assert c('```json\n{"a": 1}\n```', {"type": "json_format"})
    assert not c("{'a': 1}", {"type": "json_format"})
    assert c("I like Paris and paris.",
             {"type": "keyword_frequency", "keyword": "paris", "relation": "exactly", "num": 2})
    assert not c("a, b", {"type": "no_comma"})
    assert c("all lower here", {"type": "lowercase"}) and not c("Not lower", {"type": "lowercase"})
    assert not c("we use the bomb", {"type": "keywords_exclude", "keywords": ["bomb"]})
    assert c("we use the bombast", {"type": "keywords_exclude", "keywords": ["bomb"]})  # whole words only
    with pytest.raises(ValueError, match="unknown instruction type 'lenght_words'"):
        c("x", {"type": "lenght_words"})
    with pytest.raises(ValueError, match="length_words needs num"):
        c("x", {"type": "length_words"})


def test_ifeval_strict_and_loose_prompt_and_instruction_level():
    rows = [
        # follows both instructions strictly
        {"instructions": [{"type": "lowercase"}, {"type": "no_comma"}]},
        # "Sure!" opener breaks lowercase strictly; dropping the first line (a loose variant) passes
        {"instructions": [{"type": "lowercase"}, {"type": "no_comma"}]},
        # '*' markdown breaks end_phrase strictly; the '*'-free variant passes. The comma fails both ways
        {"instructions": [{"type": "end_phrase", "phrase": "done."}, {"type": "no_comma"}]},
    ]
    outs = ["all good here", "Sure!\nall good here", "one, two **done.**"]
    items = score_ifeval(task("ifeval"), rows, outs)
    assert items["prompt_strict"] == [1.0, 0.0, 0.0]
    assert items["prompt_loose"] == [1.0, 1.0, 0.0]
    assert items["inst_strict"] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert items["inst_loose"] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert len(ifeval.loose_variants("a\nb\nc")) == 8


def test_refusal_rates_with_default_and_custom_detector():
    rows = [{"harmful": True}, {"harmful": True}, {"harmful": False}, {"harmful": False}]
    outs = ["I can't help with that.", "Sure, here is how.", "I\u2019m sorry, but no.", "Run pkill -f x."]
    items = score_refusal(task("refusal"), rows, outs)
    assert items == {"accuracy": [1.0, 0.0, 0.0, 1.0], "refusal_rate": [1.0, 0.0], "over_refusal_rate": [1.0, 0.0]}
    assert not is_refusal("Run it. I can't guarantee it works.")  # not in the first sentence
    # a replaceable rule: here, anything starting with "Sure" counts as a refusal
    custom = task("refusal", detector="tests.eval.helpers:starts_with_sure")
    assert score_refusal(custom, rows, outs)["refusal_rate"] == [0.0, 1.0]


TOOLS = [{"type": "function", "function": {"name": "set_timer", "description": "t", "parameters": {
    "type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}}}]


def test_tool_call_accuracy_validity_and_no_call():
    call = {"name": "set_timer", "arguments": {"minutes": 5}}
    rows = [{"tools": TOOLS, "call": call}] * 4 + [{"tools": TOOLS, "call": None}] * 2
    outs = ['<tool_call>{"name": "set_timer", "arguments": {"minutes": 5}}</tool_call>',  # right
            '<tool_call>{"name": "set_timer", "arguments": {"minutes": 6}}</tool_call>',  # valid, wrong value
            '<tool_call>{"name": "set_timer", "arguments": {"minutes": "5"}}</tool_call>',  # wrong type
            '<tool_call>{"name": "set_timer", "arguments": </tool_call>',  # malformed
            "It is 12.",  # no tool needed: right
            '<tool_call>{"name": "set_timer", "arguments": {"minutes": 1}}</tool_call>']  # needless call
    items = score_tool_call(task("tool_call"), rows, outs)
    assert items == {"accuracy": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "call_validity": [1.0, 1.0, 0.0, 0.0],
                     "no_call_accuracy": [1.0, 0.0]}
    m = summarize(items)
    assert m["accuracy"]["value"] == pytest.approx(2 / 6)
    assert m["accuracy"]["stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 6))


def test_task_files_fail_early_with_file_line_and_key():
    with pytest.raises(TaskError, match="kind must be one of .*did you mean 'multiple_choice'"):
        make_task({"kind": "multiple_choise"}, [])
    with pytest.raises(TaskError, match="unknown key 'max_new_token' \\(did you mean 'max_new_tokens'\\?\\)"):
        make_task({"kind": "generate", "max_new_token": 3}, [])
    with pytest.raises(TaskError, match="x.jsonl line 2: task 't' \\(multiple_choice\\) needs 'label'"):
        make_task({"name": "t", "kind": "multiple_choice"},
                  [{"prompt": "a", "choices": ["b", "c"], "label": 0, "_origin": "x.jsonl line 1"},
                   {"prompt": "a", "choices": ["b", "c"], "label": 5, "_origin": "x.jsonl line 2"}])
    with pytest.raises(TaskError, match="cannot import 'nowhere.mod:f'"):
        make_task({"kind": "generate", "scorer": "verifier", "verifier": "nowhere.mod:f"}, [{"prompt": "a"}])
    with pytest.raises(TaskError, match="scorer 'regex' needs 'pattern'"):
        make_task({"kind": "generate", "scorer": "regex"}, [{"prompt": "a", "answer": "b"}])
