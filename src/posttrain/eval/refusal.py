"""Refusal and over-refusal rates of a model's greedy answers to labelled rows (the safety stage's
before/after numbers); the detector is `posttrain.data.refusal.is_refusal`."""

from __future__ import annotations

from posttrain.data.refusal import refusal_scores
from posttrain.data.tools import render_prompt
from posttrain.eval.lm import generate


def prompt_messages(row: dict) -> list[dict]:
    """The turns to answer: a conversation without its final answer, or a preference row's prompt."""
    if "messages" in row:
        msgs = row["messages"]
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    return [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else list(row["prompt"])


def measure_refusals(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """`refusal_scores` of greedy answers to the rows labelled `harmful` (through the chat template)."""
    rows = [r for r in rows if isinstance(r.get("harmful"), bool)]
    prompts = [render_prompt(tokenizer, prompt_messages(r), r.get("tools")) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return refusal_scores(rows, outs)
