"""Batched greedy generation and the gym's two evaluation numbers.

`greedy_complete` is deliberately small (left padding, KV cache, stop at end-of-turn) so that
the rollout engine can replace it later: `task_accuracy` and `regression_score` only need
"prompts in, completion strings out".
"""

from __future__ import annotations

import torch
from posttrain.data.tools import render_prompt

MAX_NEW_TOKENS = {"instruct": 32, "preference": 32, "refusal": 24, "tools": 48, "reasoning": 112, "regression": 24}


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def greedy_complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32,
                    batch_size: int = 32) -> list[str]:
    """Greedy completions of raw-text `prompts` (special tokens in them are parsed), in order."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                 use_cache=True)
            for r, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def chat_prompt(tokenizer, row: dict) -> str:
    """The generation prompt of a conversational or preference row: every turn before the last answer."""
    messages = row["prompt"] if "prompt" in row and isinstance(row["prompt"], list) else row["messages"][:-1]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; the gym's chat tasks need one")

    return render_prompt(tokenizer, messages, row.get("tools"))
