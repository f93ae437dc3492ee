"""The gym: a generated world, tasks with verifiers, and the bundled base model.

    from posttrain import gym
    rows = gym.load_task_rows("instruct", "train")        # conversational rows + verifier columns
    gym.verify("instruct", rows[0], "12")                   # -> bool
    model, tok = posttrain.load(gym.base_model_path())
    gym.task_accuracy(model, tok, task="instruct")          # held-out exact match, 0-1
    gym.regression_score(model, tok)                        # plain-text skills, 0-1

Tasks and their row formats:
- instruct: conversational `messages` + `answer`, `check`, `kind`
- preference: `prompt`, `chosen`, `rejected` (conversational) + `answer`, `check`
- reasoning: conversational (worked solution ending "Answer: N") + `answer`
- refusal: conversational + `harmful` (bool) + `answer`
- tools: conversational (assistant `tool_calls`) + `tools` (OpenAI schemas) + `call` (None = no call)
- regression: prompt-completion (plain text, not chat)
See docs/gym.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from posttrain.gym import instruct, lookup, preference, reasoning, refusal, regression, tools
from posttrain.gym.facts import SPLITS
from posttrain.gym.generate import MAX_NEW_TOKENS, chat_prompt, greedy_complete
from posttrain.gym.verify import verify

_GENERATORS = {
    "instruct": instruct.rows,
    "preference": preference.rows,
    "reasoning": reasoning.rows,
    "refusal": refusal.rows,
    "tools": tools.rows,
    "lookup": lookup.rows,
    "regression": regression.rows,
}
TASKS = tuple(_GENERATORS)
DEFAULT_N = {"train": 2000, "validation": 200, "test": 200}

__all__ = ["TASKS", "verifier_reward", "SPLITS", "load_task_rows", "verify", "export", "base_model_path", "task_accuracy",
           "regression_score", "greedy_complete", "chat_prompt"]


def _check_task(task: str) -> None:
    if task not in _GENERATORS:
        import difflib

        near = difflib.get_close_matches(task, TASKS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"unknown gym task '{task}'{hint} (tasks: {', '.join(TASKS)})")


def load_task_rows(task: str, split: str, n: Optional[int] = None, seed: int = 0) -> list[dict]:
    """`n` distinct rows of `task` from `split` (default: 2000 train, 200 validation/test).

    Deterministic in (task, split, n, seed); a row's split is a hash of its underlying fact, so
    train, validation and test never share one, whatever the seed.
    """
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose from {SPLITS}")
    if n is None:
        # the regression facts are few (small arithmetic ranges): its train split holds ~1,800
        n = min(DEFAULT_N[split], 1500) if task == "regression" else DEFAULT_N[split]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _GENERATORS[task](split, n, seed)


def export(task: str, split: str, out_path: Union[str, Path], n: Optional[int] = None, seed: int = 0) -> Path:
    """Write `task`/`split` as JSONL (one row per line, standard formats); returns the path."""
    rows = load_task_rows(task, split, n=n, seed=seed)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def base_model_path() -> Path:
    """The bundled base model's directory (HF format: config, safetensors, tokenizer, chat template)."""
    p = Path(__file__).resolve().parent / "base_model"
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"bundled base model missing at {p}; run scripts/pretrain_base_model.py")
    return p


def task_accuracy(model, tokenizer, task: str = "instruct", split: str = "test", n: int = 200,
                  batch_size: int = 32, seed: int = 0, return_completions: bool = False):
    """Held-out accuracy on a chat task: greedy completions through the chat template, verified.

    Returns a float in [0, 1], or (accuracy, completions) with `return_completions=True`.
    """
    if task == "regression":
        return regression_score(model, tokenizer, n=n, split=split, batch_size=batch_size, seed=seed)
    rows = load_task_rows(task, split, n=n, seed=seed)
    prompts = [chat_prompt(tokenizer, r) for r in rows]
    outs = greedy_complete(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS[task], batch_size=batch_size)
    acc = sum(verify(task, r, c) for r, c in zip(rows, outs)) / max(1, len(rows))
    return (acc, outs) if return_completions else acc


def regression_score(model, tokenizer, n: int = 200, split: str = "test", batch_size: int = 32, seed: int = 0,
                     return_completions: bool = False):
    """Plain-text capability score in [0, 1]: greedy exact match on the regression suite."""
    rows = load_task_rows("regression", split, n=n, seed=seed)
    outs = greedy_complete(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=MAX_NEW_TOKENS["regression"],
                           batch_size=batch_size)
    acc = sum(verify("regression", r, c) for r, c in zip(rows, outs)) / max(1, len(rows))
    return (acc, outs) if return_completions else acc


def verifier_reward(task: str):
    """The task's verifier as a 0/1 reward function with the GRPO signature
    f(prompts, completions, **columns) -> list[float]; the columns rebuild each row."""
    _check_task(task)

    def reward(prompts, completions, **cols):
        rows = [{k: v[i] for k, v in cols.items()} for i in range(len(completions))]
        return [1.0 if verify(task, r, c) else 0.0 for r, c in zip(rows, completions)]

    reward.__name__ = f"gym_{task}"
    return reward

