"""combine(): weighted sum over applicable rewards; the registry's names."""

import pytest

from posttrain.rewards import REWARDS, combine, get_reward, math_answer_reward, think_format_reward


def test_weighted_sum_skips_not_applicable_and_keeps_all_none_rows_none():
    completions = ["<think>t</think>\\boxed{4}", "<think>t</think>5", "4", "no"]
    fn = combine([math_answer_reward, think_format_reward], weights=[1.0, 0.25])
    answers = ["4", "4", "4", None]
    assert fn([""] * 4, completions, answer=answers) == [1.25, 0.25, 1.0, 0.0]

    def only_first(prompts, completions, **_):
        return [1.0] + [None] * (len(completions) - 1)

    both_none = combine([only_first, math_answer_reward], [2.0, 1.0])
    assert both_none(["", ""], ["1", "2"], answer=["1", None]) == [3.0, None]
    assert both_none.__name__ == "combine(only_first, math_answer_reward)"


def test_combine_errors():
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        combine([math_answer_reward, think_format_reward], [1.0])
    with pytest.raises(ValueError, match="reward short returned 1 scores for 2 completions"):
        def short(prompts, completions, **_):
            return [0.0]
        combine([short])(["", ""], ["a", "b"])


def test_registry():
    assert get_reward("math") is math_answer_reward
    assert set(REWARDS) >= {"math", "format", "tool_call", "json_schema", "code"}
    with pytest.raises(ValueError, match="unknown reward 'tool_calls'; did you mean 'tool_call'"):
        get_reward("tool_calls")
