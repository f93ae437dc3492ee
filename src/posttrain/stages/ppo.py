"""Stage `ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Batch: `train.batch_size` prompts sampled once and scored (`rewards.SequenceScorer`); `losses.ppo_advantages`
turns score, per-token KL to the reference and a value model (inside the policy: one optimizer, one
checkpoint; not published) into GAE advantages for `ppo.epochs x ppo.minibatches` steps of the clipped policy
+ vf_coef x clipped value loss. Measured: score, KL and its coefficient, explained variance, length, times.
"""

from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from posttrain.config import RunConfig, register_stage_schema
from posttrain.engine.dist import unwrap
from posttrain.engine.setup import load_for_training
from posttrain.engine.trainer import RolloutStage
from posttrain.losses.rl import KL_ESTIMATORS, explained_variance, masked_mean, ppo_advantages, ppo_policy_loss, ppo_value_loss
from posttrain.models.loading import resolve_device
from posttrain.models.value import attach_value_model
from posttrain.rewards.sets import AdaptiveKLController, SequenceScorer
from posttrain.rollout import completion_logprobs
from posttrain.rollout.prompts import prompt_data
from posttrain.rollout.session import RolloutSession
from posttrain.stages.common import RunResult, run_training
from posttrain.stages.rl_common import SamplingSection, check_rl_run, hacking_checks, sample_and_score

VALUE_ATTR = "ppo_value"


class PPOSection(SamplingSection):
    reward_model: Optional[str] = Field(None, description="A reward model directory (stage `reward` output); its "
                                        "score of prompt + completion is the reward.")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score beside `rewards`.")
    value_model: Literal["policy", "reward"] = Field("policy", description="Value model trunk: the start policy or RM.")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty (initial value when adaptive).")
    kl_estimator: Literal[KL_ESTIMATORS] = Field("k1", description="Per-token KL estimator in the reward "
                                                "(Schulman 2020: k1 = log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r).")
    target_kl: Optional[float] = Field(None, gt=0, description="Adaptive KL controller target (nats per sequence, "
                                       "Ziegler et al. 2019); None = fixed kl_coef.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller horizon (samples).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount (Schulman et al. 2016).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Schulman et al. 2016).")
    whiten_advantages: bool = Field(True, description="Normalize advantages over the rollout batch.")
    missing_eos_penalty: Optional[float] = Field(None, ge=0, description="Subtracted from the score of a completion "
                                                 "that hit max_new_tokens without EOS.")
    epochs: int = Field(4, gt=0, description="PPO epochs over each rollout batch.")
    minibatches: int = Field(1, gt=0, description="Optimizer steps per epoch (rows split evenly).")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    value_clip: float = Field(0.2, gt=0, description="Value clip range around the rollout-time values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")


class PPOConfig(RunConfig):
    stage: str = Field("ppo", description="The stage this config is for (set by the command).")
    ppo: PPOSection = Field(default_factory=PPOSection, description="PPO options (docs/rl.md).")

    @model_validator(mode="after")
    def _check_ppo(self) -> "PPOConfig":
        check_rl_run(self, "ppo")
        if self.ppo.value_model == "reward" and not self.ppo.reward_model:
            raise ValueError("ppo.value_model=reward needs ppo.reward_model (a reward model directory)")
        if self.ppo.minibatches > self.train.batch_size:
            raise ValueError(f"ppo.minibatches={self.ppo.minibatches} exceeds train.batch_size={self.train.batch_size}")
        return self


register_stage_schema("ppo", PPOConfig)


class PPOStage(RolloutStage):
    name = "ppo"

    def __init__(self, cfg: PPOConfig, tokenizer, reward_fns: Sequence[Callable] = ()):
        self.p = p = cfg.ppo
        if not (p.rewards or reward_fns or p.reward_model):
            raise ValueError("ppo: no reward: set ppo.reward_model (a reward model directory) and/or ppo.rewards")
        self.steps_per_rollout = p.epochs * p.minibatches
        self.session = RolloutSession.for_run(tokenizer, p, cfg)
        self.kl_ctl = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
        self.score = SequenceScorer(tokenizer, reward_model=p.reward_model, reward_model_weight=p.reward_model_weight,
                                    rewards=p.reward_set(reward_fns) if (p.rewards or reward_fns) else None,
                                    missing_eos_penalty=p.missing_eos_penalty)

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        p, device = self.p, next(model.parameters()).device
        ro, score, metrics = sample_and_score(self.session, model, batch["rows"], lambda r, c: self.score(r, c, device))
        t2, t = time.perf_counter(), ro.batch()
        t.update(self.session.logprobs(model, t, reference=True, temperature=p.temperature))
        values = self.session.evaluate(model, lambda m, b: getattr(m, VALUE_ATTR).completion_values(b), t)
        mask, beta = t["completion_mask"].bool(), self.kl_ctl.value
        adv, returns, kl = ppo_advantages(score, t["logprobs"], t.pop("ref_logps"), values, mask, kl_coef=beta,
                                          kl_estimator=p.kl_estimator, gamma=p.gamma, lam=p.lam,
                                          whiten_advantages=p.whiten_advantages)
        self.kl_ctl.update(seq_kl := float(kl.sum(1).mean()), len(ro))
        t.update(advantages=adv, returns=returns, old_values=values, row=torch.arange(len(ro)))
        metrics.update({"score": float(score.mean()), "kl": seq_kl, "kl_coef": beta,
                        "kl_per_token": float(kl.sum() / mask.sum().clamp(min=1)),
                        "non_score_reward": float((-beta * kl).sum(1).mean()),
                        "explained_variance": float(explained_variance(values, returns, mask)),
                        "ref_value_time_s": time.perf_counter() - t2, **self.session.metrics})
        return self.session.steps(t, len(ro), passes=p.epochs, minibatches=p.minibatches,
                                  micro_batch_size=p.micro_batch_size, extra={"rollout_metrics": metrics})

    def loss(self, model, batch: dict):
        mask = batch["completion_mask"].bool()
        logps, entropy = completion_logprobs(model, batch, temperature=self.p.temperature, with_entropy=True)
        # under DDP the value head sits on the wrapped module; its gradients are still all-reduced
        values = getattr(unwrap(model), VALUE_ATTR).completion_values(batch)
        pl, m = ppo_policy_loss(logps, batch["logprobs"], batch["advantages"], mask, clip=self.p.clip)
        vl = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=self.p.value_clip)
        u = torch.where(mask, batch["logprobs"] - logps.detach(), 0.0)  # for approx_kl_old, 0.5 E[(log r)^2]
        m.update(policy_loss=float(pl.detach()), value_loss=float(vl.detach()), entropy=float(masked_mean(entropy.detach(), mask)),
                 approx_kl_old=float(masked_mean(0.5 * u ** 2, mask)), **batch["rollout_metrics"])
        return (pl + self.p.vf_coef * vl) * self.num_loss_units(batch), m

    def num_loss_units(self, batch: dict) -> int:  # tokens: the policy and value losses are token means
        return int(batch["completion_mask"].sum())

    def state_dict(self) -> dict:  # the sampling counters and the adaptive KL coefficient
        return {**self.session.state_dict(), "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict) -> None:
        self.session.load_state_dict(state)
        self.kl_ctl.value = float(state["kl_coef"])


def prepare_model(cfg: PPOConfig, model=None, tokenizer=None):
    """The policy (full or adapter) with its value model (trunk: `ppo.value_model`) attached under `ppo_value`."""
    model, tokenizer = (model, tokenizer) if model is not None else load_for_training(cfg)
    src = cfg.ppo.reward_model if cfg.ppo.value_model == "reward" else cfg.model
    return attach_value_model(model, src, VALUE_ATTR, device=resolve_device(cfg.train.device),
                              trust_remote_code=cfg.trust_remote_code, seed=cfg.train.seed), tokenizer


def run(cfg: PPOConfig, *, resume: bool = False, reward_fns: Sequence[Callable] = (), model=None, tokenizer=None,
        **kw) -> RunResult:
    """Train with PPO. `reward_fns` add Python reward functions to the reward model's score."""
    if cfg.stage != "ppo" or not isinstance(cfg, PPOConfig):
        raise ValueError(f"ppo.run needs a ppo config (load_config('ppo', ...)), got stage {cfg.stage!r}")
    model, tokenizer = prepare_model(cfg, model, tokenizer)
    # the monitor reads PPO's score as the reward and its per-token KL (its `kl` is per sequence)
    checks = hacking_checks(cfg.ppo, cfg.ppo.epochs * cfg.ppo.minibatches, names={"reward": "score", "kl": "kl_per_token"})
    return run_training(cfg, lambda tok: PPOStage(cfg, tok, reward_fns), prompt_data, resume=resume, model=model,
                        tokenizer=tokenizer, make_checks=checks, **kw)
