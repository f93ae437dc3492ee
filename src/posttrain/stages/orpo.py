"""Stage `orpo`: ORPO, SFT plus an odds-ratio preference term, no reference model (Hong et al. 2024).

Batch: B pairs as 2B rows (chosen first). Loss: `posttrain.losses.orpo_loss` with the chosen side's
token-mean NLL and the mean completion log-probs of both sides, from one forward pass; one unit =
one pair. Held out: the share of pairs whose chosen side has the higher mean log-prob.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.engine.reference import forward_mean_logps
from posttrain.eval.preference import pair_accuracy_evaluator
from posttrain.losses.preference import orpo_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import pair_metrics, run_pairwise
from posttrain.stages.simpo import mean_logp_scores


class ORPOSection(Section):
    lam: float = Field(0.1, ge=0, description="Weight of the odds-ratio term (the paper's lambda; 0.1 there).")


class ORPOConfig(RunConfig):
    orpo: ORPOSection = Field(default_factory=ORPOSection, description="ORPO options (Hong et al. 2024).")


register_stage_schema("orpo", ORPOConfig)


class ORPOStage:
    name = "orpo"

    def __init__(self, cfg: ORPOConfig):
        self.o, self.t = cfg.orpo, cfg.train

    def loss(self, model, batch):
        B = batch["num_pairs"]
        mean, logps, counts = forward_mean_logps(model, batch)
        losses, log_odds = orpo_loss(mean[:B], mean[B:], -mean[:B], lam=self.o.lam)
        m = pair_metrics(mean[:B].detach(), mean[B:].detach(), logps, counts, B)
        m.update(log_odds=float(log_odds.mean()), nll_chosen=float(-mean[:B].detach().mean()))
        return losses.sum(), m

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])

    def held_out_evaluator(self, items, collate):
        return pair_accuracy_evaluator(items, collate, mean_logp_scores, batch_size=self.t.batch_size,
                                       precision=self.t.precision)


def run(cfg: ORPOConfig, *, resume: bool = False, **kw) -> RunResult:
    if cfg.stage != "orpo":
        raise ValueError(f"orpo.run got a '{cfg.stage}' config")
    return run_pairwise(cfg, lambda ref: ORPOStage(cfg), reference_mode=None, resume=resume, **kw)
