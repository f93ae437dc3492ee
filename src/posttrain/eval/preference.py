"""Held-out measures of the preference stages: pairwise accuracy (with the KL to the reference) and
KTO's label accuracy, as engine evaluators `(model, step) -> dict`."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from posttrain.data.preference import to_preference_examples, tokenize_pairs
from posttrain.data.preference_batches import collate_pairs, pad_id_of
from posttrain.data.sources import read_records
from posttrain.engine.precision import autocast
from posttrain.engine.reference import Reference, forward_logps, forward_token_logprobs

Score = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, torch.Tensor]"]


def _batches(items: Sequence, collate: Callable, batch_size: int, device):
    for s in range(0, len(items), batch_size):
        chunk = list(items[s:s + batch_size])
        yield len(chunk), {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(chunk).items()}


def pair_accuracy_evaluator(items: Sequence, collate: Callable, score: Score, *, batch_size: int,
                            reference: Optional[Reference] = None, precision: str = "fp32") -> Callable:
    """An engine evaluator `(model, step) -> dict` over held-out pairs.

    `score(model, batch) -> (chosen_scores [B], rejected_scores [B])`; `pref_accuracy` is the share
    of pairs where the chosen side scores higher. With a `reference`, `kl_to_ref` is the mean
    per-token KL(pi || pi_ref) over the completion tokens of the held-out prompts (exact over the
    vocabulary at each position, teacher-forced on the chosen completion).
    """

    @torch.no_grad()
    def evaluate(model, step):
        device = next(model.parameters()).device
        wins, n, kl_sum, kl_tokens = 0, 0, 0.0, 0
        for B, b in _batches(items, collate, batch_size, device):
            with autocast(precision, device):
                c, r = score(model, b)
            wins += int((c > r).sum())
            n += B
            if reference is None:
                continue
            sub = {k: b[k][:B] for k in ("input_ids", "attention_mask", "labels")}
            with autocast(precision, device):
                ref = reference.token_logprobs(model, sub)
                if ref is None:
                    continue
                pol = forward_token_logprobs(model, sub)
            mask = sub["labels"][:, 1:] != -100
            kl = (pol.exp() * (pol - ref)).sum(-1)
            kl_sum += float(kl[mask].sum())
            kl_tokens += int(mask.sum())
        out = {"pref_accuracy": wins / max(n, 1)}
        if kl_tokens:
            out["kl_to_ref"] = kl_sum / kl_tokens
        return out

    return evaluate


def label_accuracy_evaluator(items: Sequence, collate: Callable, reference: Reference, *, batch_size: int,
                             precision: str = "fp32") -> Callable:
    """KTO's held-out measures: `label_accuracy`, the share of examples whose implicit reward has the
    label's sign (desirable > 0 > undesirable), and `kl`, the mean mismatched-pair KL estimate."""

    @torch.no_grad()
    def evaluate(model, step):
        device = next(model.parameters()).device
        right, n, kls = 0, 0, []
        for B, b in _batches(items, collate, batch_size, device):
            with autocast(precision, device):
                lp = forward_logps(model, b)[0]
                ref = reference.logps(model, b)
            r = lp[:B] - ref[:B]
            right += int(((r > 0) == b["kto_labels"]).sum())
            n += B
            kls.append(float((lp[B:] - ref[B:]).mean()))
        return {"label_accuracy": right / max(n, 1), "kl": sum(kls) / max(len(kls), 1)}

    return evaluate


def implicit_reward_score(reference: Reference, beta: float) -> Score:
    """Each side's DPO implicit reward beta * (log pi - log pi_ref), as a held-out score."""

    def score(model, batch):
        B = batch["num_pairs"]
        r = beta * (forward_logps(model, batch)[0] - reference.logps(model, batch))
        return r[:B], r[B:]

    return score


def held_out_pref_accuracy(model, tokenizer, rows: list[dict], *, beta: float = 0.1, batch_size: int = 32,
                           max_length: int = 256) -> float:
    """Implicit-reward pairwise accuracy of an adapter-trained policy on preference `rows`
    (the reference is the same model with its adapter disabled)."""
    items = tokenize_pairs(to_preference_examples(read_records(rows), "paired"), tokenizer, max_length=max_length)
    collate = functools.partial(collate_pairs, pad_id=pad_id_of(tokenizer))
    score = implicit_reward_score(Reference("adapter", model), beta)
    return pair_accuracy_evaluator(items, collate, score, batch_size=batch_size)(model, 0)["pref_accuracy"]
