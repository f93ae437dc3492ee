"""What the preference stages (dpo, kto, orpo, simpo, reward) share: data, batches, held-out
metrics and the run recipe (log-probs and the reference model are in `stages.reference`).

A batch of B pairs is ONE padded batch of 2B rows: the B chosen sequences, then the B rejected
ones, so the policy (and the reference) run one forward pass per micro-batch; with
`data.packing` whole pairs are packed into rows instead. KTO batches are B examples followed by
their B mismatched prompt/completion rows (for the KL reference point).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from posttrain.config import RunConfig
from posttrain.data.collate import collate_padded
from posttrain.data.packing import pack_bfd
from posttrain.data.preference import (
    mismatched, split_held_out, to_preference_examples, tokenize_pairs, tokenize_unpaired,
)
from posttrain.data.sources import GYM_PREFIX, DataError, file_sha256, read_records, records_sha256
from posttrain.engine.trainer import TrainData
from posttrain.stages.common import RunResult, load_for_training, run_training
from posttrain.stages.reference import (  # noqa: F401  (re-exported for the stage modules)
    Reference, forward_logps, forward_token_logprobs, precompute_reference,
)

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.safetensors"


class Section(BaseModel):
    """Base of the per-stage option sections (`dpo:`, `kto:`, ...): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------ data


def _load_examples(sources, kind: str, hashes: dict, stats: dict) -> list:
    out: list = []
    for src in [sources] if isinstance(sources, str) else list(sources):
        records = read_records(src)
        hashes[str(src)] = records_sha256(records) if str(src).startswith(GYM_PREFIX) else file_sha256(src)
        out.extend(to_preference_examples(records, kind, stats))
    return out


def build_preference_data(cfg: RunConfig, tokenizer, kind: str) -> tuple[list, Optional[list], dict, dict]:
    """(train items, held-out items or None, stats, input hashes) of paired or unpaired data."""
    d = cfg.data
    if not d.train:
        raise DataError("no training data: set data.train (a file, a list of files, or gym:preference)")
    if d.mix is not None:
        raise DataError(f"data.mix is not supported by the {cfg.stage} stage: general data has no preference "
                        "labels; remove data.mix")
    if d.chat_template:
        tokenizer.chat_template = d.chat_template
    hashes: dict = {}
    stats: dict = {"stage": cfg.stage, "max_length": d.max_length}
    eval_stats: dict = {}
    train = _load_examples(d.train, kind, hashes, stats)
    if d.limit:
        train = train[:d.limit]
    if d.eval:
        held = _load_examples(d.eval, kind, hashes, eval_stats)
    elif d.eval_fraction > 0:
        train, held = split_held_out(train, d.eval_fraction, cfg.train.seed)
    else:
        held = None
    tok = tokenize_pairs if kind == "paired" else tokenize_unpaired
    stats["rows"] = len(train)
    train_items = tok(train, tokenizer, max_length=d.max_length, overflow=d.overflow, stats=stats)
    if not train_items:
        raise DataError(f"no training examples left after tokenization (max_length={d.max_length})")
    eval_items = None
    if held is not None:
        eval_items = tok(held, tokenizer, max_length=d.max_length, overflow=d.overflow, stats=eval_stats)
        stats["eval"] = eval_stats
    return train_items, eval_items, stats, hashes


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def collate_pairs(items, pad_id: int) -> dict:
    """B pairs -> one padded batch of 2B rows (chosen rows first), `num_pairs`, and `ref_logps` [2B]
    when every pair carries precomputed reference log-probs."""
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    batch = collate_padded(rows, pad_id)
    batch["num_pairs"] = len(items)
    batch["num_real_tokens"] = sum(len(r) for r in rows)
    if all(p.ref is not None for p in items):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in items] + [p.ref[1] for p in items])
    return batch


def pack_pairs(items: list, row_len: int, stats: dict) -> list[list]:
    """Best-fit-decreasing packing of whole pairs (both sides together) into rows of `row_len` tokens."""
    from posttrain.data.packing import pack_bfd, packing_efficiency

    lengths = [len(p.chosen) + len(p.rejected) for p in items]
    rows = pack_bfd(lengths, row_len)
    stats["packed_rows"] = len(rows)
    stats["packing_efficiency"] = round(packing_efficiency(lengths, rows, row_len), 4)
    return [[items[i] for i in row] for row in rows]


def collate_preference(items, pad_id: int, row_len: Optional[int] = None) -> dict:
    """Pairs, or packed rows of pairs (lists), as one batch. Packed rows hold c1 r1 c2 r2 ... with
    attention kept inside each sequence (`collate_packed`); `segment_ids` [B,T] say which of the 2P
    sequences (chosen k -> k, rejected k -> P + k) each token belongs to."""
    if not items or not isinstance(items[0], list):
        return collate_pairs(items, pad_id)
    from posttrain.data.collate import collate_packed

    pairs = [p for row in items for p in row]
    P = len(pairs)
    batch = collate_packed([[x for p in row for x in (p.chosen, p.rejected)] for row in items], pad_id, row_len)
    seg = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for b, row in enumerate(items):
        s = 0
        for p in row:
            for side, x in ((k, p.chosen), (P + k, p.rejected)):
                seg[b, s:s + len(x)] = side
                s += len(x)
            k += 1
    batch.update(segment_ids=seg, num_pairs=P, num_real_tokens=int((seg >= 0).sum()))
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])
    return batch


def collate_pairs_padding_free(items, pad_id: int) -> dict:
    """The batch's pairs without padding to the longest sequence (`data.padding_free`): the same
    pairs and loss as `collate_pairs`, packed best-fit-decreasing into rows of twice the longest pair.

    One row of the whole batch would have no padding at all, but its dense [T, T] attention mask
    makes attention cost grow with the batch; rows of two longest pairs keep padding small (BFD)
    and attention close to the padded cost (DPO bench: 1.9x TRL's speed, docs/benchmarks.md).
    """
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in items]
    cap = min(2 * max(lengths), sum(lengths))
    rows = [[items[i] for i in row] for row in pack_bfd(lengths, cap)]
    return collate_preference(rows, pad_id, row_len=cap)


def collate_unpaired(items, pad_id: int, max_length: int) -> dict:
    """B examples followed by B mismatched rows (prompt i, completion of example i+1 mod B), `labels_kto` [B]."""
    from posttrain.losses.preference import mismatched_indices

    rows = [x.item for x in items]
    # a held-out remainder of one example has no other completion; it is paired with its own
    idx = mismatched_indices(len(rows)).tolist() if len(rows) > 1 else [0]
    rows = rows + [mismatched(rows[i], rows[j], max_length) for i, j in enumerate(idx)]
    batch = collate_padded(rows, pad_id)
    batch["num_examples"] = len(items)
    batch["num_real_tokens"] = sum(len(r) for r in rows[:len(items)])
    batch["kto_labels"] = torch.tensor([x.label for x in items], dtype=torch.bool)
    return batch


# ------------------------------------------------------------------------- metrics


def pair_metrics(chosen_rewards, rejected_rewards, policy_logps, counts, B: int) -> dict:
    """The per-step preference metrics every pairwise stage logs."""
    margin = chosen_rewards - rejected_rewards
    return {"reward_chosen": float(chosen_rewards.mean()), "reward_rejected": float(rejected_rewards.mean()),
            "reward_margin": float(margin.mean()), "pair_accuracy": float((margin > 0).float().mean()),
            "logp_chosen": float(policy_logps[:B].detach().mean()),
            "logp_rejected": float(policy_logps[B:].detach().mean()),
            "completion_tokens": float(counts.float().mean())}


def held_out_evaluator(items: Sequence, collate: Callable, score: Callable, *, batch_size: int,
                       reference: Optional[Reference] = None, autocast=None) -> Callable:
    """An engine evaluator `(model, step) -> dict` over held-out pairs.

    `score(model, batch) -> (chosen_scores [B], rejected_scores [B])`; `pref_accuracy` is the share
    of pairs where the chosen side scores higher. With a `reference`, `kl_to_ref` is the mean
    per-token KL(pi || pi_ref) over the completion tokens of the held-out prompts (exact over the
    vocabulary at each position, teacher-forced on the chosen completion).
    """
    ctx = autocast or (lambda: torch.autocast("cpu", enabled=False))

    @torch.no_grad()
    def evaluate(model, step):
        device = next(model.parameters()).device
        wins, n, kl_sum, kl_tokens = 0, 0, 0.0, 0
        for s in range(0, len(items), batch_size):
            chunk = list(items[s:s + batch_size])
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(chunk).items()}
            with ctx():
                c, r = score(model, b)
            wins += int((c > r).sum())
            n += len(chunk)
            if reference is not None:
                B = len(chunk)
                sub = {k: b[k][:B] for k in ("input_ids", "attention_mask", "labels")}
                with ctx():
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


# ------------------------------------------------------------------------- the recipe


def autocast_for(cfg: RunConfig, model) -> Callable:
    device = next(model.parameters()).device.type
    bf16 = cfg.train.precision == "bf16"
    return lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def run_pairwise(cfg: RunConfig, make_stage: Callable, score: Optional[Callable], *, reference_mode: Optional[str],
                 kind: str = "paired", held_out_fn: Optional[Callable] = None, resume: bool = False,
                 evaluators: Sequence[Callable] = (), model=None, tokenizer=None, guard=None) -> RunResult:
    """Train a preference stage: load, (reference), data (+ precomputed reference), held-out evaluator, engine.

    make_stage(tokenizer, reference) -> Stage; score(model, batch) -> (chosen [B], rejected [B]) for
    held-out accuracy; reference_mode None for reference-free methods (ORPO, SimPO, reward).
    kind "unpaired" (KTO) batches examples with their mismatched rows; `held_out_fn(items, collate,
    reference, autocast) -> evaluator` replaces the pairwise held-out evaluator.
    """
    if model is None:
        model, tokenizer = load_for_training(cfg)
    reference = Reference(reference_mode, model) if reference_mode else None
    ac = autocast_for(cfg, model)
    held: dict = {}

    def make_data(cfg_, tok):
        train, eval_items, stats, hashes = build_preference_data(cfg_, tok, kind)
        if kind == "paired":
            row_len = 2 * cfg_.data.max_length  # a row always fits the longest pair
            if cfg_.data.padding_free:
                collate = functools.partial(collate_pairs_padding_free, pad_id=pad_id_of(tok))
            else:
                collate = functools.partial(collate_preference, pad_id=pad_id_of(tok), row_len=row_len)
        elif cfg_.data.padding_free:
            raise DataError("data.padding_free is not supported by the kto stage (its batches pair examples "
                            "across rows); set data.padding_free=false")
        else:
            collate = functools.partial(collate_unpaired, pad_id=pad_id_of(tok), max_length=cfg_.data.max_length)
        if reference_mode == "precomputed":
            splits = {"train": train, **({"eval": eval_items} if eval_items else {})}
            precompute_reference(model, splits, collate, batch_size=cfg_.train.batch_size,
                                 path=Path(cfg_.output_dir) / REFERENCE_FILE, model_id=str(cfg_.model), autocast=ac)
        held["items"], held["collate"] = eval_items, collate
        if cfg_.data.packing:
            if kind != "paired":
                raise DataError("data.packing is not supported by the kto stage (its batches pair examples "
                                "across rows); set data.packing=false")
            train = pack_pairs(train, row_len, stats)
        return TrainData(train=train, eval=eval_items, collate=collate, stats=stats, hashes=hashes)

    def held_out(model_, step):
        if not held.get("items"):
            return {}
        if held_out_fn is not None:
            return held_out_fn(held["items"], held["collate"], reference, ac)(model_, step)
        fn = held_out_evaluator(held["items"], held["collate"], score, batch_size=cfg.train.batch_size,
                                reference=reference, autocast=ac)
        return fn(model_, step)

    return run_training(cfg, lambda tok: make_stage(tok, reference), make_data, resume=resume,
                        evaluators=[held_out, *evaluators], guard=guard, model=model, tokenizer=tokenizer)


def resolve_reference(mode: Optional[str], cfg: RunConfig) -> str:
    """`None` picks `adapter` for adapter runs and `copy` for full fine-tuning."""
    if mode is None:
        return "adapter" if cfg.adapter.type != "none" else "copy"
    return mode


def held_out_pref_accuracy(model, tokenizer, rows: list[dict], *, beta: float = 0.1, batch_size: int = 32,
                           max_length: int = 256) -> float:
    """Implicit-reward pairwise accuracy of an adapter-trained policy on preference `rows`
    (the reference is the same model with its adapter disabled)."""
    from posttrain.data.sources import read_records as _read

    items = tokenize_pairs(to_preference_examples(_read(rows), "paired"), tokenizer, max_length=max_length)
    ref = Reference("adapter", model)
    collate = functools.partial(collate_pairs, pad_id=pad_id_of(tokenizer))

    def score(m, b):
        B = b["num_pairs"]
        r = beta * (forward_logps(m, b)[0] - ref.logps(m, b))
        return r[:B], r[B:]

    return held_out_evaluator(items, collate, score, batch_size=batch_size)(model, 0)["pref_accuracy"]
