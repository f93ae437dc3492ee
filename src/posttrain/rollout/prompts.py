"""RL prompts: rows with a prompt, rendered for generation; every other column goes to the rewards."""

from __future__ import annotations

from posttrain.data.hub import as_list, load_records
from posttrain.data.sources import DataError
from posttrain.data.tools import render_prompt
from posttrain.engine.trainer import TrainData

PROMPT_KEYS = ("prompt", "messages")


def prompt_text(tokenizer, row: dict) -> str:
    """The generation prompt of a row: a `prompt` string as is, or chat messages through the template
    (tools in the template's way, or the documented fallback).

    A conversational row (`messages`) whose last turn is the assistant's is prompted with the
    turns before it, so SFT data can be reused as RL prompts.
    """
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    msgs = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"row has no prompt: give a 'prompt' (text or messages) or 'messages'; keys: {sorted(row)}")
    if msgs[-1].get("role") == "assistant" and "prompt" not in row:
        msgs = msgs[:-1]
    return render_prompt(tokenizer, msgs, row.get("tools"))


def prompt_data(cfg, tokenizer) -> TrainData:
    """RL data of a run config: rows with a prompt (`_prompt` rendered); a batch is {"rows": [...]}."""
    if not cfg.data.train:
        raise DataError(f"{cfg.stage}: no prompts: set data.train (a file, a list of files, or gym:TASK)")

    d = cfg.data

    def read(src, split):
        rows = []
        for s in as_list(src):  # files, gym:TASK, hf:ORG/NAME, datasets objects; data.columns applied
            for rec in load_records(s, split=split, columns=d.columns, streaming=d.streaming, limit=d.limit)[0]:
                if not any(k in rec.data for k in PROMPT_KEYS):
                    raise DataError(f"{rec.origin}: no 'prompt' or 'messages' column to prompt the policy with")
                rows.append({**rec.data, "_prompt": prompt_text(tokenizer, rec.data)})
        return rows

    train = read(cfg.data.train, "train")
    if cfg.data.limit:
        train = train[:cfg.data.limit]
    if len(train) < cfg.train.batch_size:
        raise DataError(f"{cfg.stage}: {len(train)} prompts is fewer than train.batch_size={cfg.train.batch_size}")
    return TrainData(train=train, collate=lambda rows: {"rows": list(rows)}, stats={"prompts": len(train)})


def columns(rows: list[dict]) -> dict[str, list]:
    """Dataset columns for reward functions: every key except the prompt fields."""
    return {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("_prompt", "prompt")}
