"""Stage `kto`: Kahneman-Tversky Optimization on unpaired thumbs-up/down data (paired data is split
into chosen = desirable and rejected = undesirable automatically).

Each micro-batch is B examples plus their B mismatched rows (prompt i with the completion of
example i+1 in the batch) in one forward pass; the mismatched rows give the KL reference point z
(`posttrain.losses.kto_kl_estimate`). One unit = one example. Held out: the share of examples
whose implicit reward has the label's sign, and the KL estimate.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.engine.reference import Reference, forward_logps
from posttrain.eval.preference import label_accuracy_evaluator
from posttrain.losses.preference import kto_kl_estimate, kto_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import check_reference, resolve_reference, run_pairwise


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
    kto: KTOSection = Field(default_factory=KTOSection, description="KTO options (Ethayarajh et al. 2024).")

    @model_validator(mode="after")
    def _check_kto(self) -> "KTOConfig":
        if self.train.batch_size < 2:
            raise ValueError("kto needs train.batch_size >= 2: its KL estimate pairs each prompt with another "
                             "example's completion in the batch")
        check_reference("kto.reference", self.kto.reference, self.adapter.type, alternatives="copy")
        return self


register_stage_schema("kto", KTOConfig)


class KTOStage:
    name = "kto"

    def __init__(self, cfg: KTOConfig, reference: Reference):
        self.o, self.t = cfg.kto, cfg.train
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

    def held_out_evaluator(self, items, collate):
        return label_accuracy_evaluator(items, collate, self.reference, batch_size=self.t.batch_size,
                                        precision=self.t.precision)


def run(cfg: KTOConfig, *, resume: bool = False, **kw) -> RunResult:
    if cfg.stage != "kto":
        raise ValueError(f"kto.run got a '{cfg.stage}' config")
    return run_pairwise(cfg, lambda ref: KTOStage(cfg, ref), reference_mode=resolve_reference(cfg.kto.reference, cfg),
                        kind="unpaired", resume=resume, **kw)
