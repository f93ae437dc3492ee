"""The two model calls evaluation needs: log-likelihood of continuations, and batched generation.

Both are plain functions of (model, tokenizer, strings) so that every task kind, the forgetting
guard and the lm-evaluation-harness adapter share one implementation.

Tokenization of (context, continuation) follows lm-evaluation-harness: the pair is encoded as
one string and the continuation's tokens are those after the context's own encoding, so a
tokenizer that merges across the boundary does not shift the scored span; trailing spaces of
the context move to the continuation. An empty context is replaced by one prefix token (BOS,
else EOS), because the first token needs something to be predicted from.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from posttrain.rollout import RolloutEngine, SamplingParams


def max_length(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def prefix_token(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if t is not None:
            return t
    raise ValueError("the tokenizer has no BOS, EOS or pad token to start an empty context with")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not ctx:
        return [prefix_token(tokenizer)], whole
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def score_spans(model, seqs: list[tuple[list[int], int]], *, batch_size: int = 16,
                pad_id: int = 0) -> list[tuple[float, bool]]:
    """For each (token ids, n): the summed log-prob of the last n tokens given the ones before,
    and whether every one of them is the greedy (argmax) token. Right padding, one forward per batch."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[Optional[tuple[float, bool]]] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # long first: the OOM shows early
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
                mask[r, :len(seqs[i][0])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                toks, n = seqs[i]
                L = len(toks)
                lp = logp[r, L - n - 1:L - 1]  # position t predicts token t+1
                tgt = torch.tensor(toks[L - n:], device=lp.device)
                out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    finally:
        model.train(was)
    return out  # type: ignore[return-value]


def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], *,
                  batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per (context, continuation) pair.

    Contexts longer than the model's window are cut from the left (the continuation is kept whole).
    """
    limit = max_length(model)
    seqs = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise ValueError(f"empty continuation for context {ctx[-40:]!r}: nothing to score")
        if len(k) >= limit:
            raise ValueError(f"continuation of {len(k)} tokens does not fit the model's window of {limit}")
        seqs.append(((c + k)[-limit:], len(k)))
    return score_spans(model, seqs, batch_size=batch_size, pad_id=_pad(tokenizer))


def rolling_windows(tokens: list[int], prefix: int, limit: int) -> list[tuple[list[int], int]]:
    """Disjoint windows that score every token of `tokens` exactly once, as in lm-eval's
    `loglikelihood_rolling`: each window of at most `limit` tokens scores the tokens after its
    first one that no earlier window scored (the first token is predicted from `prefix`)."""
    full = [prefix] + tokens
    windows = []
    chunk = limit - 1  # a window of `limit` tokens predicts its last limit - 1
    for s in range(0, len(tokens), chunk):
        e = min(s + chunk, len(tokens))
        start = max(0, e + 1 - limit)  # the window is full[start:e+1]; full[e] is the last target
        windows.append((full[start:e + 1], e - s))
    return windows


def loglikelihood_rolling(model, tokenizer, texts: list[str], *, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed log-prob of every token of the text, number of tokens) per text."""
    limit = max_length(model)
    pre = prefix_token(tokenizer)
    seqs, owner, counts = [], [], []
    for j, text in enumerate(texts):
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        counts.append(len(toks))
        for w in rolling_windows(toks, pre, limit):
            seqs.append(w)
            owner.append(j)
    scores = score_spans(model, seqs, batch_size=batch_size, pad_id=_pad(tokenizer))
    totals = [0.0] * len(texts)
    for j, (lp, _) in zip(owner, scores):
        totals[j] += lp
    return list(zip(totals, counts))


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token(tokenizer)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, stop: tuple[str, ...] = (),
             batch_size: int = 32, seed: int = 0) -> list[str]:
    """Greedy completions of raw-text prompts (chat templates already applied), cut at the first stop string.

    This is the one place evaluation generates: the rollout engine, batched, left-padded, with a
    KV cache, stopping each row at its end-of-turn token.
    """
    torch.manual_seed(seed)  # greedy decoding needs no randomness; this pins anything that might
    engine = RolloutEngine(model, tokenizer, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(s for s in stop if s),
                            seed=seed)
    outs = engine.generate(list(prompts), params).completions
    return [cut_at_stop(o, stop) for o in outs]


def cut_at_stop(text: str, stop) -> str:
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]
