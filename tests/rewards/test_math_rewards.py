"""Final-answer extraction and numeric matching (built-in path; math-verify path when importable)."""

from fractions import Fraction

import pytest

from posttrain.rewards import accuracy, answers_match, extract_answer, math_answer_reward, parse_number


@pytest.mark.parametrize("text,expected", [
    ("so we get \\boxed{\\frac{3}{4}} in the end", "\\frac{3}{4}"),
    ("nested \\boxed{x^{2}} and later \\boxed{7}", "7"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("The answer is 1,234.", "1,234."),
    ("Answer: -0.5\nthanks", "-0.5"),
    ("I have 3 apples and 4 pears, 7 in total", "7"),
    ("<think>maybe 5? no, 6</think>The result is 12", "12"),
    ("<think>still thinking about 5", None),
    ("no digits here", None),
    ("cut off \\boxed{12", "12"),  # unbalanced box: falls back to the last number
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s,value", [
    ("42", Fraction(42)), ("-7", Fraction(-7)), ("1,234,567", Fraction(1234567)), ("3.50", Fraction(7, 2)),
    ("3/4", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{-1}{8}", Fraction(-1, 8)),
    ("$1,000", Fraction(1000)), ("50%", Fraction(50)), ("x = 5", Fraction(5)), ("1e3", Fraction(1000)),
    ("\\text{12}", Fraction(12)), ("1\\,000", Fraction(1000)), ("7.", Fraction(7)),
    ("1,23", None), ("x+1", None), ("3/0", None), ("", None),
])
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("pred,gold,equal", [
    ("1,234", 1234, True), ("1234.0", "1234", True), ("0.75", "\\frac{3}{4}", True), ("3/4", 0.75, True),
    ("0.333", "1/3", False), ("42 apples", "42", True), ("41", 42, False), ("0.1", 0.1, True),
    ("2", "x(x+2)", False), ("\\text{Paris}", "paris", True), ("Paris", "London", False), (None, "1", False),
])
def test_answers_match(pred, gold, equal):
    assert answers_match(pred, gold) is equal


def test_reward_scores_rows_and_marks_missing_answers_not_applicable():
    completions = [
        "<think>6*7</think>The answer is \\boxed{42}",
        "<think>hmm</think>41",
        "<think>never closes 42",
        "The total is 1,500 dollars.",
        "whatever",
    ]
    gold = ["42", 42, "42", "Janet earns 1500.\n#### 1500", None]
    scores = math_answer_reward([""] * 5, completions, answer=gold, backend="builtin")
    assert scores == [1.0, 0.0, 0.0, 1.0, None]
    assert accuracy is math_answer_reward


def test_reward_without_answer_column_is_not_applicable_and_checks_lengths():
    assert math_answer_reward(["p", "q"], ["1", "2"]) == [None, None]
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        math_answer_reward(["p", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="backend must be auto, builtin or math_verify"):
        math_answer_reward(["p"], ["1"], answer=["1"], backend="sympy")


def test_conversational_completion_is_scored_on_last_assistant_message():
    completion = [{"role": "assistant", "content": "\\boxed{9}"}]
    assert math_answer_reward([[{"role": "user", "content": "3*3?"}]], [completion], answer=[9]) == [1.0]


def test_math_verify_backend_when_installed():
    pytest.importorskip("math_verify")
    completions = ["so \\boxed{\\frac{1}{2}}", "it is $x^2+2x$", "\\boxed{0.3}", "The answer is 1,234."]
    gold = ["0.5", "x(x+2)", "1/3", "1234"]
    assert math_answer_reward([""] * 4, completions, answer=gold, backend="math_verify") == [1.0, 1.0, 0.0, 1.0]
    # symbolic equality is beyond the built-in matcher
    assert math_answer_reward([""], ["it is $x^2+2x$"], answer=["x(x+2)"], backend="builtin") == [0.0]


def test_math_verify_backend_missing_is_a_clear_error():
    try:
        import math_verify  # noqa: F401
        pytest.skip("math-verify is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install math-verify"):
        math_answer_reward([""], ["1"], answer=["1"], backend="math_verify")
