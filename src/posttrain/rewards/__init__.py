"""Built-in verifiable rewards (public ``posttrain.rewards``). See docs/rewards.md.

Every reward is ``f(prompts, completions, **dataset_columns) -> list[float | None]``; None means
"not applicable to this row". ``get_reward(name)`` resolves the names used in configs.
"""

from __future__ import annotations

import difflib

from posttrain.rewards.base import RewardFn, combine, completion_text
from posttrain.rewards.code import code_reward, extract_code, make_code_reward, run_tests
from posttrain.rewards.format import make_format_reward, think_format_reward
from posttrain.rewards.math import accuracy, answers_match, extract_answer, math_answer_reward, parse_number
from posttrain.rewards.sandbox import SandboxLimits, SandboxResult, isolation_report, run_python
from posttrain.rewards.schema import schema_errors, validate_json
from posttrain.rewards.tools import (
    ToolCall,
    ToolCallParseError,
    json_schema_reward,
    parse_tool_calls,
    tool_call_reward,
    validate_call,
)

REWARDS: dict[str, RewardFn] = {
    "math": math_answer_reward,
    "accuracy": math_answer_reward,
    "format": think_format_reward,
    "think_format": think_format_reward,
    "tool_call": tool_call_reward,
    "json_schema": json_schema_reward,
    "code": code_reward,
}


def get_reward(name: str) -> RewardFn:
    """The built-in reward called ``name``; the error suggests the nearest valid name."""
    if name in REWARDS:
        return REWARDS[name]
    near = difflib.get_close_matches(name, REWARDS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"unknown reward {name!r}{hint} (built-in: {', '.join(sorted(REWARDS))})")


__all__ = [
    "REWARDS", "RewardFn", "SandboxLimits", "SandboxResult", "ToolCall", "ToolCallParseError", "accuracy",
    "answers_match", "code_reward", "combine", "completion_text", "extract_answer", "extract_code",
    "get_reward", "isolation_report", "json_schema_reward", "make_code_reward", "make_format_reward",
    "math_answer_reward", "parse_number", "parse_tool_calls", "run_python", "run_tests", "schema_errors",
    "think_format_reward", "tool_call_reward", "validate_call", "validate_json",
]
