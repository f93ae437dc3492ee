"""Stage `kto`: Kahneman-Tversky Optimization on unpaired thumbs-up/down data (paired data is split
into chosen = desirable and rejected = undesirable automatically).

Each micro-batch is B examples plus their B mismatched rows (prompt i with the completion of
example i+1 in the batch) in one forward pass; the mismatched rows give the KL reference point z
(`posttrain.losses.kto_kl_estimate`). One unit = one example.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from posttrain.config import RunConfig, register_stage_schema
from posttrain.losses.preference import kto_kl_estimate, kto_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import Section, forward_logps, resolve_reference, run_pairwise


class KTOSection(Section):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (Ethayarajh et al. 2024).")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D; the paper advises lambda_D n_D / (lambda_U n_U) "
                                                           "in [1, 4/3].")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U.")
    reference: Optional[Literal["adapter", "copy"]] = Field(
        None, description="adapter (the adapter-disabled policy) or copy (a frozen copy). Default: adapter for "
                          "adapter runs, else copy. precomputed is not offered: the KL reference point pairs "
                          "completions within each (random) batch, so its reference log-probs cannot be cached.")


class KTOConfig(RunConfig):
    kto: KTOSection = Field(default_factory=KTOSection)

    @model_validator(mode="after")
    def _check_kto(self) -> "KTOConfig":
        if self.train.batch_size < 2:
            raise ValueError("kto needs train.batch_size >= 2: its KL estimate pairs each prompt with another "
                             "example's completion in the batch")
        if self.kto.reference == "adapter" and self.adapter.type == "none":
            raise ValueError("kto.reference=adapter needs an adapter (set adapter.type=lora) or use kto.reference=copy")
        return self


register_stage_schema("kto", KTOConfig)


class KTOStage:
    name = "kto"

    def __init__(self, opts: KTOSection, reference):
        self.o = opts
        self.reference = reference

    def loss(self, model, batch):
        B = batch["num_examples"]
        logps, counts = forward_logps(model, batch)
        ref = self.reference.logps(model, batch).to(logps.dtype)
        z = kto_kl_estimate(logps[B:], ref[B:])
        labels = batch["kto_labels"]
        losses, rewards = kto_loss(logps[:B], ref[:B], labels, z, beta=self.o.beta,
                                   desirable_weight=self.o.desirable_weight,
                                   undesirable_weight=self.o.undesirable_weight)
        m = {"kl": float(z), "logp": float(logps[:B].detach().mean()), "desirable_share": float(labels.float().mean())}
        if labels.any():
            m["reward_desirable"] = float(rewards[labels].mean())
        if (~labels).any():
            m["reward_undesirable"] = float(rewards[~labels].mean())
        return losses.sum(), m

    def num_loss_units(self, batch) -> int:
        return int(batch["num_examples"])


def held_out(items, collate, reference, autocast, batch_size: int):
    """`label_accuracy`: share of held-out examples whose implicit reward has the label's sign
    (desirable > 0 > undesirable); `kl`: the mean mismatched-pair KL estimate."""

    @torch.no_grad()
    def evaluate(model, step):
        device = next(model.parameters()).device
        right, n, kls = 0, 0, []
        for s in range(0, len(items), batch_size):
            chunk = list(items[s:s + batch_size])
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(chunk).items()}
            with autocast():
                lp = forward_logps(model, b)[0]
                ref = reference.logps(model, b)
            B = len(chunk)
            r = lp[:B] - ref[:B]
            right += int(((r > 0) == b["kto_labels"]).sum())
            n += B
            kls.append(float((lp[B:] - ref[B:]).mean()))
        return {"label_accuracy": right / max(n, 1), "kl": sum(kls) / max(len(kls), 1)}

    return evaluate


def run(cfg: KTOConfig, *, resume: bool = False, evaluators=(), model=None, tokenizer=None, guard=None) -> RunResult:
    if cfg.stage != "kto":
        raise ValueError(f"kto.run got a '{cfg.stage}' config")
    mode = resolve_reference(cfg.kto.reference, cfg)
    bs = cfg.train.batch_size
    return run_pairwise(cfg, lambda tok, ref: KTOStage(cfg.kto, ref), None, reference_mode=mode, kind="unpaired",
                        held_out_fn=lambda items, collate, ref, ac: held_out(items, collate, ref, ac, bs),
                        resume=resume, evaluators=evaluators, model=model, tokenizer=tokenizer, guard=guard)
