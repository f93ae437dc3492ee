"""Stage `simpo`: SimPO, reference-free, on length-normalized log-probs (Meng et al. 2024).

Batch: B pairs as 2B rows (chosen first). Loss: `posttrain.losses.simpo_loss` over the mean
completion log-probs of chosen and rejected, from one forward pass; no reference model; one unit =
one pair. Held out: the share of pairs whose chosen side has the higher mean log-prob.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.engine.reference import forward_mean_logps
from posttrain.eval.preference import pair_accuracy_evaluator
from posttrain.losses.preference import simpo_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import pair_metrics, run_pairwise


class SimPOSection(Section):
    beta: float = Field(2.0, gt=0, description="Reward scale on the mean log-prob (the paper uses 2.0-2.5).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (absolute, not gamma/beta).")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Assumed label-flip rate (cDPO form).")


class SimPOConfig(RunConfig):
    simpo: SimPOSection = Field(default_factory=SimPOSection, description="SimPO options (Meng et al. 2024).")


register_stage_schema("simpo", SimPOConfig)


def mean_logp_scores(model, batch):
    """Held-out score of each side: its mean completion log-prob (SimPO's and ORPO's preference)."""
    B = batch["num_pairs"]
    mean = forward_mean_logps(model, batch)[0]
    return mean[:B], mean[B:]


class SimPOStage:
    name = "simpo"

    def __init__(self, cfg: SimPOConfig):
        self.o, self.t = cfg.simpo, cfg.train

    def loss(self, model, batch):
        B = batch["num_pairs"]
        mean, logps, counts = forward_mean_logps(model, batch)
        losses, cr, rr = simpo_loss(mean[:B], mean[B:], beta=self.o.beta, gamma=self.o.gamma,
                                    label_smoothing=self.o.label_smoothing)
        return losses.sum(), pair_metrics(cr, rr, logps, counts, B)

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])

    def held_out_evaluator(self, items, collate):
        return pair_accuracy_evaluator(items, collate, mean_logp_scores, batch_size=self.t.batch_size,
                                       precision=self.t.precision)


def run(cfg: SimPOConfig, *, resume: bool = False, **kw) -> RunResult:
    if cfg.stage != "simpo":
        raise ValueError(f"simpo.run got a '{cfg.stage}' config")
    return run_pairwise(cfg, lambda ref: SimPOStage(cfg), reference_mode=None, resume=resume, **kw)
