"""Stage `reward`: a Bradley-Terry reward model on preference pairs (Ouyang et al. 2022).

The model is the starting LM with a scalar head on its last real token
(`posttrain.models.reward`); chosen and rejected are scored in one forward pass and trained with
`posttrain.losses.reward_model_loss`. The result is saved as a ``*ForSequenceClassification``
checkpoint; held-out pairwise accuracy is reported at each evaluation.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from posttrain.config import RunConfig, Section, register_stage_schema
from posttrain.eval.preference import pair_accuracy_evaluator
from posttrain.losses.preference import reward_model_loss
from posttrain.stages.common import RunResult
from posttrain.models.reward import reward_model_from_lm, reward_scores
from posttrain.stages.preference import run_pairwise


class RewardSection(Section):
    margin: Optional[float] = Field(None, description="Constant margin m in -log sigma(s_c - s_r - m); "
                                                      "None = 0 (plain Bradley-Terry).")
    center_rewards: float = Field(0.0, ge=0, description="Weight of an auxiliary (s_c + s_r)^2 penalty that keeps "
                                                         "scores centred on 0 (Eisenstein et al. 2023); 0 disables.")


class RewardConfig(RunConfig):
    reward: RewardSection = Field(default_factory=RewardSection, description="Reward-model options.")

    @model_validator(mode="after")
    def _check_reward(self) -> "RewardConfig":
        if self.adapter.type != "none":
            raise ValueError("the reward stage trains the full model and its scalar head; set adapter.type=none")
        if self.data.packing or self.data.padding_free:
            raise ValueError("the reward stage scores one sequence per row; set data.packing=false and "
                             "data.padding_free=false")
        return self


register_stage_schema("reward", RewardConfig)


def score_pairs(model, batch):
    """The scalar head's score of each side's last token."""
    B = batch["num_pairs"]
    s = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    return s[:B], s[B:]


class RewardStage:
    name = "reward"

    def __init__(self, cfg: RewardConfig):
        self.o, self.t = cfg.reward, cfg.train

    def loss(self, model, batch):
        sc, sr = score_pairs(model, batch)
        losses = reward_model_loss(sc, sr, self.o.margin)
        if self.o.center_rewards:
            losses = losses + self.o.center_rewards * (sc + sr) ** 2
        m = {"score_chosen": float(sc.detach().mean()), "score_rejected": float(sr.detach().mean()),
             "score_margin": float((sc - sr).detach().mean()), "pair_accuracy": float((sc > sr).float().mean())}
        return losses.sum(), m

    def num_loss_units(self, batch) -> int:
        return int(batch["num_pairs"])

    def held_out_evaluator(self, items, collate):
        return pair_accuracy_evaluator(items, collate, score_pairs, batch_size=self.t.batch_size,
                                       precision=self.t.precision)


def run(cfg: RewardConfig, *, resume: bool = False, model=None, tokenizer=None, **kw) -> RunResult:
    if cfg.stage != "reward":
        raise ValueError(f"reward.run got a '{cfg.stage}' config")
    if model is None:
        if not cfg.model:
            raise ValueError("no model given: set `model` (a local HF directory)")
        model, tokenizer = reward_model_from_lm(cfg.model, device=cfg.train.device, tokenizer=cfg.tokenizer,
                                                trust_remote_code=cfg.trust_remote_code, seed=cfg.train.seed)
    model.requires_grad_(True)
    return run_pairwise(cfg, lambda ref: RewardStage(cfg), reference_mode=None, resume=resume, model=model,
                        tokenizer=tokenizer, **kw)
