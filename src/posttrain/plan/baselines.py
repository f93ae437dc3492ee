"""What `posttrain advise` measures on the base model before any training: the data analysis (answer loss
against general text, the share of the answer the base already predicts) and the prompting baselines
(zero-shot and k-shot on held-out examples, k as many as fit the context).

The data and model code (torch, transformers) is imported inside the functions that measure with a
model: `advise --no-pilots` from the planner and the data alone stays light.
"""

from __future__ import annotations

from typing import Optional


def base_model_losses(model, tokenizer, items, *, batch_size: int = 8) -> dict:
    """Mean NLL per labelled token and the share of labelled tokens that are the top-1 prediction."""
    import torch

    from posttrain.data.collate import collate_padded

    nll, hits, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = collate_padded(items[i:i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            y = batch["labels"][:, 1:]
            mask = y != -100
            lp = torch.log_softmax(logits[mask].float(), -1)
            nll -= float(lp.gather(-1, y[mask][:, None]).sum())
            hits += int((lp.argmax(-1) == y[mask]).sum())
            count += int(mask.sum())
    return {"nll": nll / max(count, 1), "top1": hits / max(count, 1), "tokens": count}


def _tokenized(source, tokenizer, max_length: int, limit: int, split: str):
    from posttrain.data.formats import to_examples
    from posttrain.data.render import tokenize_examples
    from posttrain.data.sources import read_records

    records = read_records(source, split=split)
    return tokenize_examples(to_examples(records[:limit]), tokenizer, max_length=max_length), len(records)


def analyse_data(cfg, *, general: str = "gym:regression:train", sample: int = 64) -> dict:
    """Examples, tokens, answer vs general loss and the share of the answer already predicted."""
    from posttrain.models.loading import load

    model, tok = load(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code,
                      allow_pickle=cfg.allow_pickle)
    sources = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    items, rows = [], 0
    for s in sources:
        got, n = _tokenized(s, tok, cfg.data.max_length, sample, "train")
        items += got
        rows += n
    gen_items, _ = _tokenized(general, tok, cfg.data.max_length, sample, "train")
    answer = base_model_losses(model, tok, items)
    general_loss = base_model_losses(model, tok, gen_items)
    baselines = {"zero_shot": None, "k_shot": None, "k": 0, "n": 0}
    if isinstance(cfg.data.eval, str):
        from posttrain.data.sources import read_records

        train_records = [r for s in sources for r in read_records(s, split="train")[:MAX_SHOTS * 4]]
        baselines = prompting_baselines(model, tok, train_records, read_records(cfg.data.eval, split="validation"),
                                        max_length=cfg.data.max_length)
    mean_tokens = sum(len(x.input_ids) for x in items) / max(len(items), 1)
    loss_share = sum(x.num_loss_tokens for x in items) / max(sum(len(x.input_ids) for x in items), 1)
    return {"examples": rows, "tokens_estimate": round(rows * mean_tokens), "mean_tokens": mean_tokens,
            "loss_fraction": loss_share, "answer_nll": answer["nll"], "general_nll": general_loss["nll"],
            "domain_gap_nats": answer["nll"] - general_loss["nll"], "already_predicted": answer["top1"],
            "sampled_examples": len(items), "general": general, "baselines": baselines}


# ---------------------------------------------------------------- measured prompting baselines

MAX_SHOTS = 8  # k-shot prompting uses as many training examples as fit the context, at most this many


def _split_example(ex) -> Optional[tuple[object, str]]:
    """(prompt: str or messages, reference answer) of a prompt-completion or conversational example."""
    if ex.kind == "prompt_completion" and isinstance(ex.prompt, str) and isinstance(ex.completion, str):
        return ex.prompt, ex.completion
    msgs = ex.messages if ex.kind == "conversational" and ex.messages else None
    if msgs is None and isinstance(ex.prompt, list) and isinstance(ex.completion, list):
        msgs = ex.prompt + ex.completion
    if msgs and msgs[-1].get("role") == "assistant" and isinstance(msgs[-1].get("content"), str):
        return msgs[:-1], msgs[-1]["content"]
    return None


def prompt_text(tokenizer, shots: list[tuple[object, str]], prompt) -> str:
    if isinstance(prompt, str):
        return "".join(f"{p}{a}\n\n" for p, a in shots) + prompt
    msgs = [m for p, a in shots for m in [*p, {"role": "assistant", "content": a}]] + list(prompt)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def is_correct(row: dict, completion: str, reference: str) -> bool:
    """The row's own verifier when it names one (gym rows: `check`), else a normalized exact match."""
    if "check" in row:
        from posttrain.gym.verify import verify

        try:
            return verify("advise", row, completion)
        except (ValueError, KeyError, TypeError):
            pass
    return " ".join(completion.split()).lower() == " ".join(reference.split()).lower()


def prompt_answer_pairs(records, limit: int) -> list[tuple[dict, object, str]]:
    """(row, prompt, reference answer) of the first `limit` records that have a prompt/answer split."""
    from posttrain.data.formats import to_example

    out = []
    for r in records:
        try:
            got = _split_example(to_example(r))
        except ValueError:
            continue
        if got is not None:
            out.append((r.data, *got))
        if len(out) >= limit:
            break
    return out


def prompting_baselines(model, tokenizer, train_records, held_records, *, max_length: int, n: int = 50) -> dict:
    """Zero-shot and k-shot accuracy of the base model on `n` held-out examples (greedy decoding), k as
    many training examples as fit `max_length` tokens (at most MAX_SHOTS); None when the data has no
    prompt/answer split."""
    from posttrain.eval.lm import generate

    held = prompt_answer_pairs(held_records, n)
    shots_pool = prompt_answer_pairs(train_records, MAX_SHOTS)
    if not held or not shots_pool:
        return {"zero_shot": None, "k_shot": None, "k": 0, "n": 0}
    longest = max(len(tokenizer(prompt_text(tokenizer, [], p))["input_ids"]) for _, p, _ in held)
    answer_tokens = max(len(tokenizer(a)["input_ids"]) for _, _, a in held) + 8
    shots, used = [], longest + answer_tokens
    for _, p, a in shots_pool:
        cost = len(tokenizer(prompt_text(tokenizer, [(p, a)], p))["input_ids"]) - len(
            tokenizer(prompt_text(tokenizer, [], p))["input_ids"])
        if used + cost > max_length:
            break
        shots.append((p, a))
        used += cost
    stop = tuple(s for s in (tokenizer.eos_token, "\n\n") if s)
    out = {"k": len(shots), "n": len(held)}
    for name, k_shots in (("zero_shot", []), ("k_shot", shots)):
        texts = generate(model, tokenizer, [prompt_text(tokenizer, k_shots, p) for _, p, _ in held],
                         max_new_tokens=answer_tokens, stop=stop)
        out[name] = sum(is_correct(row, c.strip(), a) for (row, _, a), c in zip(held, texts)) / len(held)
    return out
