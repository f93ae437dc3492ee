"""Stage `orpo`: ORPO, SFT plus an odds-ratio preference term, no reference model (Hong et al. 2024).

Loss: `posttrain.losses.orpo_loss` with the chosen side's token-mean NLL and the mean completion
log-probs of both sides, from one forward pass. One unit = one pair.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.config import RunConfig, register_stage_schema
from posttrain.losses.preference import orpo_loss
from posttrain.stages.common import RunResult
from posttrain.stages.preference import Section, pair_metrics, run_pairwise
from posttrain.stages.simpo import mean_logp_scores, mean_logps


class ORPOSection(Section):
    lam: float = Field(0.1, ge=0, description="Weight of the odds-ratio term (the paper's lambda; 0.1 there).")


class ORPOConfig(RunConfig):
    orpo: ORPOSection = Field(default_factory=ORPOSection)


register_stage_schema("orpo", ORPOConfig)


class ORPOStage:
    name = "orpo"

    def __init__(self, opts: ORPOSection):
        self.o = opts

    def loss(self, model, batch):
        B = batch["num_pairs"]
        mean, logps, counts = mean_logps(model, batch)
        losses, log_odds = orpo_loss(mean[:B], mean[B:], -mean[:B], lam=self.o.lam)
        m = pair_metrics(mean[:B].detach(), mean[B:].detach(), logps, counts, B)
        m.update(log_odds=float(log_odds.mean()), nll_chosen=float(-mean[:B].detach().mean()))
        return losses.sum(), m

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])


def run(cfg: ORPOConfig, *, resume: bool = False, evaluators=(), model=None, tokenizer=None, guard=None) -> RunResult:
    if cfg.stage != "orpo":
        raise ValueError(f"orpo.run got a '{cfg.stage}' config")
    return run_pairwise(cfg, lambda tok, ref: ORPOStage(cfg.orpo), mean_logp_scores, reference_mode=None,
                        resume=resume, evaluators=evaluators, model=model, tokenizer=tokenizer, guard=guard)
