"""Stage `grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) and its descendants.

Batch: `train.batch_size` prompts, each sampled G = `grpo.num_generations` times and scored by the reward
functions, or played as G multi-turn episodes rewarded by `grpo.environment` (`rl_common.EpisodeGroups`).
Advantages are relative to the group (`losses.group_advantages`: grpo, dr_grpo, rloo, reinforce_pp); each
rollout feeds `iterations x minibatches` steps of `losses.policy_loss` (grpo, gspo, cispo) with an optional
k3 KL to the reference; no critic. Measured per rollout: rewards, zero-variance groups, length, truncation,
clip fraction, entropy, times; with an environment its episode metrics (turns, tool calls, outcome). docs/rl.md.
"""

from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Sequence

from pydantic import Field, model_validator

from posttrain.config import RunConfig, register_stage_schema
from posttrain.engine.trainer import RolloutStage
from posttrain.losses.grpo import ADVANTAGE_ESTIMATORS, GRPO_AGGREGATIONS, group_advantages, zero_variance_groups
from posttrain.losses.policy import POLICY_LOSSES, policy_loss
from posttrain.losses.rl import masked_mean
from posttrain.rollout import completion_logprobs
from posttrain.rollout.prompts import prompt_data
from posttrain.rollout.session import RolloutSession, zero_advantage_filter
from posttrain.stages.common import RunResult, run_training
from posttrain.stages.rl_common import EpisodeGroups, SamplingSection, check_rl_run, hacking_checks, sample_and_score


class GRPOSection(SamplingSection):
    num_generations: int = Field(4, ge=2, description="G: completions per prompt (a group).")
    advantage: Literal[ADVANTAGE_ESTIMATORS] = Field(
        "grpo", description="Advantage estimator: grpo ((r - mean_g) / std_g, Shao et al. 2024), dr_grpo "
        "(r - mean_g, Liu et al. 2025), rloo (leave-one-out baseline, Ahmadian et al. 2024), reinforce_pp "
        "(batch-normalised, Hu 2025).")
    loss: Literal[POLICY_LOSSES] = Field(
        "grpo", description="Policy loss: grpo (clipped token ratios), gspo (sequence-level ratio and clipping, "
        "Zheng et al. 2025; set eps_low/eps_high to ~3e-4/4e-4), cispo (clipped IS weights on the policy "
        "gradient, MiniMax 2025).")
    aggregation: Literal[GRPO_AGGREGATIONS] = Field(
        "grpo", description="Token weighting of grpo/cispo: grpo (mean of sequence means), dr_grpo "
        "(sum / (B * max_new_tokens)), dapo (mean over all tokens, Yu et al. 2025).")
    eps_low: float = Field(0.2, ge=0, description="Lower clip range of the ratio.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip range (DAPO's clip-higher uses 0.28).")
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to the reference (0 = no reference pass).")
    iterations: int = Field(1, gt=0, description="mu: update passes over each generation batch.")
    minibatches: int = Field(1, gt=0, description="Optimizer steps per pass (the batch's rows split evenly).")
    mask_truncated: bool = Field(False, description="Completions that hit max_new_tokens get no loss (DAPO's "
                                 "overlong filtering).")
    skip_zero_advantage: bool = Field(True, description="Leave rows whose advantage is exactly 0 (zero-variance "
                                      "groups) out of the update's passes when beta = 0: their loss and gradient "
                                      "are 0 and they still count in the normalization, so the gradient is unchanged.")
    environment: Optional[str] = Field(None, description="Multi-turn episodes instead of completions: gym:lookup or "
                                       "'module:Class' (your code, imported because you name it); its reward replaces "
                                       "grpo.rewards. Turns are <= max_new_tokens, episodes <= data.max_length tokens.")
    environment_args: dict = Field(default_factory=dict, description="Keyword arguments of the environment class.")
    max_turns: int = Field(4, gt=0, description="Assistant turns per episode at most (with an environment).")


class GRPOConfig(RunConfig):
    stage: str = Field("grpo", description="The stage this config is for (set by the command).")
    grpo: GRPOSection = Field(default_factory=GRPOSection, description="GRPO options (docs/rl.md).")

    @model_validator(mode="after")
    def _check_grpo(self) -> "GRPOConfig":
        check_rl_run(self, "grpo", environment=self.grpo.environment)
        if self.grpo.minibatches > self.train.batch_size * self.grpo.num_generations:
            raise ValueError(f"grpo.minibatches={self.grpo.minibatches} exceeds the rows of a generation batch "
                             f"(train.batch_size x grpo.num_generations = "
                             f"{self.train.batch_size * self.grpo.num_generations})")
        return self


register_stage_schema("grpo", GRPOConfig)


class GRPOStage(RolloutStage):
    name = "grpo"

    def __init__(self, cfg: GRPOConfig, tokenizer, reward_fns: Sequence[Callable] = ()):
        self.cfg, self.g = cfg, cfg.grpo
        if not (self.g.rewards or reward_fns or self.g.environment):
            raise ValueError("grpo: no reward functions: set grpo.rewards (e.g. [math]), pass reward_fns, or set "
                             "grpo.environment")
        if self.g.environment and reward_fns:
            raise ValueError("grpo: grpo.environment gives the episode reward: pass no reward_fns")
        self.steps_per_rollout = self.g.iterations * self.g.minibatches
        # one update per rollout: the old policy is the one being updated, so in bf16 the loss takes its own
        # (detached) log-probs as the old ones instead of a second bf16 pass (fp32 keeps the sampling ones)
        self.old_is_current = self.steps_per_rollout == 1 and cfg.train.precision == "bf16"
        self.session = RolloutSession.for_run(tokenizer, self.g, cfg, n=self.g.num_generations)
        self.episodes = EpisodeGroups(self.session, self.g, cfg.data.max_length) if self.g.environment else None
        rewards = self.g.reward_set(reward_fns)
        self.score = lambda ro, cols: rewards(ro.prompts, ro.completions, cols)
        self.skip = zero_advantage_filter(self._units) if self.g.skip_zero_advantage and self.g.beta == 0 else None

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        rows, G = batch["rows"], self.g.num_generations
        ro, rewards, metrics = (self.episodes(model, rows) if self.episodes
                                else sample_and_score(self.session, model, rows, self.score, group_size=G))
        t, finished, t2 = ro.batch(), ro.finished, time.perf_counter()
        if self.g.mask_truncated:
            t["completion_mask"] = t["completion_mask"] * finished[:, None].long()
        t["advantages"] = group_advantages(rewards, G, estimator=self.g.advantage)
        t.update(self.session.logprobs(model, t, reference=self.g.beta > 0, temperature=self.g.temperature,
                                       old=not self.old_is_current))
        zero_var = zero_variance_groups(rewards, G)
        metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                   **metrics, "zero_variance_groups": float(zero_var.sum()),
                   "zero_variance_frac": float(zero_var.float().mean()), "truncated_frac": float((~finished).float().mean()),
                   "ref_time_s": time.perf_counter() - t2, **self.session.metrics}
        return self.session.steps(t, len(rewards), passes=self.g.iterations, minibatches=self.g.minibatches,
                                  micro_batch_size=self.g.micro_batch_size, extra={"rollout_metrics": metrics},
                                  keep=self.skip)

    def loss(self, model, batch: dict):
        logps, entropy = completion_logprobs(model, batch, temperature=self.g.temperature, with_entropy=True)
        mask = batch["completion_mask"].bool()
        longest = self.g.max_new_tokens * (self.g.max_turns if self.episodes else 1)  # the model's tokens of a row
        kw = {} if self.g.loss == "gspo" else {"aggregation": self.g.aggregation, "max_completion_length": longest}
        old = logps.detach() if self.old_is_current else batch["logprobs"]
        loss, m = policy_loss(self.g.loss, logps, old, batch["advantages"], mask,
                              ref_logps=batch.get("ref_logps"), beta=self.g.beta, eps_low=self.g.eps_low,
                              eps_high=self.g.eps_high, **kw)
        m = {**{k: float(v) for k, v in m.items()}, "entropy": float(masked_mean(entropy.detach(), mask)),
             **batch["rollout_metrics"]}
        return loss * self._units(batch["completion_mask"]), m

    def _units(self, completion_mask) -> int:
        # dapo is a mean over tokens; grpo, dr_grpo and gspo are means over sequences
        token_mean = self.g.loss != "gspo" and self.g.aggregation == "dapo"
        return int(completion_mask.sum()) if token_mean else int(completion_mask.shape[0])

    def num_loss_units(self, batch: dict) -> int:
        """This micro-batch's units plus those of the zero-advantage rows left out of its step."""
        return self._units(batch["completion_mask"]) + int(batch.get("skipped_units", 0))

    def state_dict(self) -> dict:
        return self.session.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.session.load_state_dict(state)


def run(cfg: GRPOConfig, *, resume: bool = False, reward_fns: Sequence[Callable] = (), **kw) -> RunResult:
    """Train with GRPO. `reward_fns` add Python reward functions to the configured `grpo.rewards`."""
    if cfg.stage != "grpo" or not isinstance(cfg, GRPOConfig):
        raise ValueError(f"grpo.run needs a grpo config (load_config('grpo', ...)), got stage {cfg.stage!r}")
    return run_training(cfg, lambda tok: GRPOStage(cfg, tok, reward_fns), prompt_data, resume=resume,
                        make_checks=hacking_checks(cfg.grpo, cfg.grpo.iterations * cfg.grpo.minibatches), **kw)
