"""Stage `dpo`: Direct Preference Optimization (sigmoid, ipo, hinge, robust) on prompt/chosen/rejected pairs.

Batch: B pairs as 2B rows (chosen first). Loss: `posttrain.losses.dpo_loss` over summed completion
log-probs of the policy and the reference (plus RPO's chosen NLL when `dpo.nll_weight` > 0); one
unit = one pair. The reference is the adapter-disabled policy, a frozen copy, or log-probs
precomputed once and cached beside the run (docs/preference.md). Held out: the share of pairs whose
chosen side has the higher implicit reward, and the per-token KL to the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.engine import run as rundir
from posttrain.engine.reference import Reference, forward_logps
from posttrain.engine.setup import load_for_training
from posttrain.eval.preference import implicit_reward_score, pair_accuracy_evaluator
from posttrain.losses.dpo import DPO_LOSS_TYPES, chosen_nll, dpo_loss
from posttrain.rollout.self_rejected import self_rejected_source
from posttrain.stages.common import RunResult
from posttrain.stages.preference import check_reference, pair_metrics, resolve_reference, run_pairwise

SELF_REJECTED_FILE = "self_rejected.jsonl"


class SelfRejectedSection(Section):
    """On-policy rejected answers (iterative RPO, Pang et al. 2024): before training, sample the
    starting model on the training prompts, keep the samples the reward rejects, and pair each with
    the row's chosen answer. The pairs go to output_dir/self_rejected.jsonl (with provenance) and
    are trained on together with the data's own pairs."""

    samples: int = Field(0, ge=0, description="Samples per training prompt (0 = off).")
    reward: Optional[str] = Field(None, description="Verifier: a built-in reward name, 'module:function' or "
                                                    "'gym:TASK'; a sample scoring <= threshold is a mistake.")
    threshold: float = Field(0.0, description="Rewards at or below this mark a sample as rejected.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(64, gt=0, description="Sample length limit (tokens).")
    per_row: int = Field(1, gt=0, description="At most this many rejected samples per prompt.")
    keep_offline_pairs: bool = Field(True, description="Also train on the data's own pairs (false: only the "
                                                       "self-rejected ones).")


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward beta*log(pi/pi_ref); "
                                               "higher keeps the policy closer to the reference (Rafailov et al. 2023).")
    loss: Literal[DPO_LOSS_TYPES] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (Azar et al. 2023), hinge (SLiC), robust (Chowdhury et al. 2024).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed label-flip rate eps (sigmoid: cDPO; "
                                                                     "robust: unbiased form). 0 for ipo and hinge.")
    reference: Optional[Literal[Reference.MODES]] = Field(
        None, description="adapter: the policy with its adapter disabled (no second model); copy: a frozen copy; "
                          "precomputed: log-probs computed once before training and cached in "
                          "output_dir/reference_logps.safetensors. Default: adapter for adapter runs, else copy.")
    self_rejected: SelfRejectedSection = Field(default_factory=SelfRejectedSection,
                                               description="On-policy rejected answers; see SelfRejectedSection.")
    nll_weight: float = Field(0.0, ge=0.0, description="alpha of RPO (Pang et al. 2024): adds alpha * the chosen "
                              "answer's per-token NLL to each pair's loss, which keeps the chosen likelihood from "
                              "falling during DPO (a known failure that lowers answer quality). 0 = plain DPO.")


class DPOConfig(RunConfig):
    dpo: DPOSection = Field(default_factory=DPOSection, description="DPO options (Rafailov et al. 2023).")

    @model_validator(mode="after")
    def _check_dpo(self) -> "DPOConfig":
        if self.dpo.label_smoothing and self.dpo.loss in ("ipo", "hinge"):
            raise ValueError(f"dpo.label_smoothing applies to dpo.loss sigmoid or robust, not {self.dpo.loss}; "
                             "set dpo.label_smoothing=0")
        if self.dpo.self_rejected.samples and not self.dpo.self_rejected.reward:
            raise ValueError("dpo.self_rejected.samples needs dpo.self_rejected.reward (a verifier such as "
                             "'gym:preference', a built-in reward name or 'module:function')")
        check_reference("dpo.reference", self.dpo.reference, self.adapter.type)
        return self


register_stage_schema("dpo", DPOConfig)


class DPOStage:
    name = "dpo"

    def __init__(self, cfg: DPOConfig, reference: Reference):
        self.o, self.t = cfg.dpo, cfg.train
        self.reference = reference

    def loss(self, model, batch):
        B = batch["num_pairs"]
        logps, counts = forward_logps(model, batch)
        ref = self.reference.logps(model, batch).to(logps.dtype)
        losses, cr, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=self.o.beta, loss_type=self.o.loss,
                                  label_smoothing=self.o.label_smoothing, chosen_lengths=counts[:B],
                                  rejected_lengths=counts[B:])
        metrics = pair_metrics(cr, rr, logps, counts, B)
        if self.o.nll_weight:
            nll = chosen_nll(logps[:B], counts[:B])
            losses = losses + self.o.nll_weight * nll
            metrics["nll_chosen"] = float(nll.detach().mean())
        return losses.sum(), metrics

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])

    def held_out_evaluator(self, items, collate):
        score = implicit_reward_score(self.reference, self.o.beta)
        return pair_accuracy_evaluator(items, collate, score, batch_size=self.t.batch_size,
                                       reference=self.reference, precision=self.t.precision)


def run(cfg: DPOConfig, *, resume: bool = False, model=None, tokenizer=None, **kw) -> RunResult:
    if cfg.stage != "dpo":
        raise ValueError(f"dpo.run got a '{cfg.stage}' config")
    o = cfg.dpo.self_rejected
    if o.samples:  # the starting model's own mistakes as rejected answers, sampled before training
        rundir.claim(cfg, resume)  # before anything is written into output_dir
        if model is None:
            model, tokenizer = load_for_training(cfg)
        sources = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
        f = self_rejected_source(model, tokenizer, sources, o, out=Path(cfg.output_dir) / SELF_REJECTED_FILE,
                                 seed=cfg.train.seed, model_name=str(cfg.model), resume=resume)
        train = [*sources, str(f)] if o.keep_offline_pairs else [str(f)]
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": train})})
    return run_pairwise(cfg, lambda ref: DPOStage(cfg, ref), reference_mode=resolve_reference(cfg.dpo.reference, cfg),
                        resume=resume, model=model, tokenizer=tokenizer, **kw)
