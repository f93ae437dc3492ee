"""The recipe the preference stages (dpo, kto, orpo, simpo, reward, safety's dpo form) share.

Data and batches are `posttrain.data.preference_batches`, log-probs and the reference model
`posttrain.engine.reference`, the held-out measures `posttrain.eval.preference`. A stage module
supplies its config section, its `Stage` (loss and held-out evaluator) and calls `run_pairwise`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from posttrain.config import RunConfig
from posttrain.data.preference_batches import load_preference_data, pack_pairs, preference_collate
from posttrain.engine.reference import Reference, precompute_reference
from posttrain.engine.setup import load_for_training
from posttrain.engine.trainer import TrainData
from posttrain.stages.common import RunResult, run_training

REFERENCE_FILE = "reference_logps.safetensors"


def pair_metrics(chosen_rewards, rejected_rewards, policy_logps, counts, B: int) -> dict:
    """The per-step metrics every pairwise stage logs: rewards [B] of each side (the method's own),
    the policy's summed completion log-probs [2B] and completion token counts [2B], chosen rows first."""
    margin = chosen_rewards - rejected_rewards
    return {"reward_chosen": float(chosen_rewards.mean()), "reward_rejected": float(rejected_rewards.mean()),
            "reward_margin": float(margin.mean()), "pair_accuracy": float((margin > 0).float().mean()),
            "logp_chosen": float(policy_logps[:B].detach().mean()),
            "logp_rejected": float(policy_logps[B:].detach().mean()),
            "completion_tokens": float(counts.float().mean())}


def resolve_reference(mode: Optional[str], cfg: RunConfig) -> str:
    """`None` picks `adapter` for adapter runs and `copy` for full fine-tuning."""
    return mode if mode is not None else Reference.default_mode(cfg.adapter.type)


def check_reference(key: str, mode: Optional[str], adapter_type: str, alternatives: str = "copy / precomputed") -> None:
    """A config check: `KEY=adapter` (the adapter-disabled policy as the reference) needs an adapter run."""
    if mode == "adapter" and adapter_type == "none":
        raise ValueError(f"{key}=adapter needs an adapter (set adapter.type=lora) or use {key}={alternatives} "
                         "for full fine-tuning")


def run_pairwise(cfg: RunConfig, make_stage: Callable[[Optional[Reference]], object], *,
                 reference_mode: Optional[str], kind: str = "paired", resume: bool = False, model=None,
                 tokenizer=None, **kw) -> RunResult:
    """Load the policy, build its reference (`reference_mode`; None for reference-free methods),
    hand it to `make_stage(reference)`, and train on the run's pairs (`kind` "paired") or
    thumbs-up/down examples ("unpaired", KTO); `kw` go to `run_training`. The stage's `held_out_evaluator(items, collate)`
    measures the held-out data; a `precomputed` reference scores every pair once before training.
    """
    if model is None:
        model, tokenizer = load_for_training(cfg)
    reference = Reference(reference_mode, model) if reference_mode else None
    stage = make_stage(reference)

    def make_data(cfg_, tok):
        d = cfg_.data
        train, eval_items, stats, hashes = load_preference_data(d, tok, kind, stage=cfg_.stage, seed=cfg_.train.seed)
        collate = preference_collate(d, tok, kind)
        if reference_mode == "precomputed":
            splits = {"train": train, **({"eval": eval_items} if eval_items else {})}
            precompute_reference(model, splits, collate, batch_size=cfg_.train.batch_size,
                                 path=Path(cfg_.output_dir) / REFERENCE_FILE, model_id=str(cfg_.model),
                                 precision=cfg_.train.precision)
        held_out = [stage.held_out_evaluator(eval_items, collate)] if eval_items else []
        if d.packing:
            train = pack_pairs(train, 2 * d.max_length, stats)  # a row always fits the longest pair
        return TrainData(train=train, eval=eval_items, collate=collate, stats=stats, hashes=hashes,
                         evaluators=held_out)

    return run_training(cfg, lambda tok: stage, make_data, resume=resume, model=model, tokenizer=tokenizer, **kw)
