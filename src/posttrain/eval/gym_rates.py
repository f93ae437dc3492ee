"""Safety and tool-use rates on held-out gym rows: the numbers the `safety` and `tools` rows report.

Both functions generate greedily through the chat template (as `task_accuracy` does) and score
with the library's own rules, so the gym, `posttrain eval` and the stages agree:

- `refusal_rates`: `posttrain.data.refusal.refusal_scores`, the numbers the `safety` stage reports
  before and after training (the one refusal detector, a refusal marker in the first sentence,
  on harmful requests and on their benign look-alikes);
- `tool_call_rates`: `posttrain.rewards.parse_tool_calls` / `validate_call` against the offered
  schemas, the same parser and checks as the `tool_call` reward that GRPO uses.
"""

from __future__ import annotations

from posttrain.data.refusal import refusal_scores
from posttrain.gym import load_task_rows
from posttrain.gym.generate import MAX_NEW_TOKENS, chat_prompt, greedy_complete
from posttrain.gym.verify import call_matches
from posttrain.rewards import ToolCallParseError, parse_tool_calls, validate_call


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def tool_call_scores(rows: list[dict], outputs: list[str]) -> dict:
    """On rows that need a call (row['call'] set):
    - valid_call_rate: exactly one call, naming the expected function, whose arguments pass the
      offered schema (every required argument present, JSON types right);
    - exact_call_rate: the same call with the expected argument values too (the gym verifier).
    On rows that need none: no_call_rate, the completion makes no call (and no malformed attempt).
    """
    valid, exact, no_call = [], [], []
    for row, out in zip(rows, outputs):
        try:
            calls = parse_tool_calls(out)
        except ToolCallParseError:
            calls = None
        want = row.get("call")
        if want is None:
            no_call.append(float(calls == []))
            continue
        one = calls is not None and len(calls) == 1 and calls[0].name == want["name"]
        ok = one and validate_call(calls[0], row["tools"])[0]
        valid.append(float(ok))
        exact.append(float(ok and call_matches(calls[0].to_dict(), want)))
    return {"valid_call_rate": _mean(valid), "exact_call_rate": _mean(exact), "no_call_rate": _mean(no_call),
            "n_call": len(valid), "n_no_call": len(no_call)}


def _outputs(model, tokenizer, task: str, split: str, n: int, batch_size: int, seed: int):
    rows = load_task_rows(task, split, n=n, seed=seed)
    prompts = [chat_prompt(tokenizer, r) for r in rows]
    return rows, greedy_complete(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS[task],
                                 batch_size=batch_size)


def refusal_rates(model, tokenizer, *, split: str = "test", n: int = 200, batch_size: int = 32,
                  seed: int = 0) -> dict:
    """`refusal_scores` of greedy answers to `n` gym refusal rows of `split` (about half harmful)."""
    rows, outs = _outputs(model, tokenizer, "refusal", split, n, batch_size, seed)
    return refusal_scores(rows, outs)


def tool_call_rates(model, tokenizer, *, split: str = "test", n: int = 200, batch_size: int = 32,
                    seed: int = 0) -> dict:
    """`tool_call_scores` of greedy answers to `n` gym tool rows of `split` (about 30% need no call)."""
    rows, outs = _outputs(model, tokenizer, "tools", split, n, batch_size, seed)
    return tool_call_scores(rows, outs)


# Pipeline / demo measurements (`fn(model, tokenizer, **args) -> {column: float}`, the contract of
# posttrain.pipeline.register_measure): the two headline rates of each row, without the counts.


def refusal_measure(model, tokenizer, *, split: str = "test", n: int = 200) -> dict:
    r = refusal_rates(model, tokenizer, split=split, n=n)
    return {"refusal_rate": r["refusal_rate"], "over_refusal_rate": r["over_refusal_rate"]}


def tool_call_measure(model, tokenizer, *, split: str = "test", n: int = 200) -> dict:
    r = tool_call_rates(model, tokenizer, split=split, n=n)
    return {"valid_call_rate": r["valid_call_rate"], "no_call_rate": r["no_call_rate"]}


MEASURES = {"refusal_rates": refusal_measure, "tool_call_rates": tool_call_measure}
