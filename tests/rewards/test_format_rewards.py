"""Format rewards: one closed reasoning block followed by a non-empty final answer."""

import pytest

from posttrain.rewards import make_format_reward, think_format_reward


def score(fn, *completions):
    return fn([""] * len(completions), list(completions))


def test_think_then_answer():
    assert score(
        think_format_reward,
        "<think>2+2 is 4</think>\nThe answer is 4.",   # well formed
        "  <think>\nstep\n</think>4",                   # whitespace around is fine
        "The answer is 4.",                             # no reasoning
        "<think>2+2 is 4</think>",                       # no final answer
        "<think>2+2</think> 4 <think>again</think> 4",   # a second block
        "<think>2+2 is 4",                              # never closed
        "<think> </think>4",                            # empty reasoning
        "Sure. <think>x</think>4",                       # text before the block
    ) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_custom_tags_and_answer_block():
    fn = make_format_reward("reasoning", "answer")
    assert score(
        fn,
        "<reasoning>r</reasoning><answer>42</answer>",
        "<reasoning>r</reasoning>\n<answer>\n42\n</answer>\n",
        "<reasoning>r</reasoning>42",
        "<reasoning>r</reasoning><answer></answer>",
        "<reasoning>r</reasoning><answer>4</answer><answer>2</answer>",
        "<think>r</think><answer>42</answer>",
    ) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert fn.__name__ == "format_reward_reasoning_answer"


def test_think_opened_by_the_prompt():
    fn = make_format_reward(think_opened_in_prompt=True)
    assert score(fn, "reasoning here</think>42", "<think>again</think>42", "42") == [1.0, 0.0, 0.0]


def test_bad_tag_name_is_rejected():
    with pytest.raises(ValueError, match="tag must be a plain XML name, got 'th ink'"):
        make_format_reward("th ink")
