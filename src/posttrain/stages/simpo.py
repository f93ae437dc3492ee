"""Stage `simpo`: SimPO, reference-free, on length-normalized log-probs (Meng et al. 2024).

Loss: `posttrain.losses.simpo_loss` over the mean completion log-probs of chosen and rejected,
from one forward pass; no reference model. One unit = one pair.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.config import RunConfig, register_stage_schema
from posttrain.losses.preference import simpo_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import Section, forward_logps, pair_metrics, run_pairwise


class SimPOSection(Section):
    beta: float = Field(2.0, gt=0, description="Reward scale on the mean log-prob (the paper uses 2.0-2.5).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (absolute, not gamma/beta).")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Assumed label-flip rate (cDPO form).")


class SimPOConfig(RunConfig):
    simpo: SimPOSection = Field(default_factory=SimPOSection)


register_stage_schema("simpo", SimPOConfig)


def mean_logps(model, batch):
    logps, counts = forward_logps(model, batch)
    return logps / counts.clamp(min=1), logps, counts


class SimPOStage:
    name = "simpo"

    def __init__(self, opts: SimPOSection):
        self.o = opts

    def loss(self, model, batch):
        B = batch["num_pairs"]
        mean, logps, counts = mean_logps(model, batch)
        losses, cr, rr = simpo_loss(mean[:B], mean[B:], beta=self.o.beta, gamma=self.o.gamma,
                                    label_smoothing=self.o.label_smoothing)
        return losses.sum(), pair_metrics(cr, rr, logps, counts, B)

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])


def mean_logp_scores(model, batch):
    """Held-out score of each side: its mean completion log-prob (SimPO's and ORPO's preference)."""
    B = batch["num_pairs"]
    mean = mean_logps(model, batch)[0]
    return mean[:B], mean[B:]


def run(cfg: SimPOConfig, *, resume: bool = False, evaluators=(), model=None, tokenizer=None, guard=None) -> RunResult:
    if cfg.stage != "simpo":
        raise ValueError(f"simpo.run got a '{cfg.stage}' config")
    return run_pairwise(cfg, lambda tok, ref: SimPOStage(cfg.simpo), mean_logp_scores, reference_mode=None,
                        resume=resume, evaluators=evaluators, model=model, tokenizer=tokenizer, guard=guard)
