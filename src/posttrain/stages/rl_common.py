"""The sampling options PPO and GRPO share (their rollouts run through `posttrain.rollout.session`)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from posttrain.config import Section
from posttrain.rewards.sets import RewardSet
from posttrain.rollout import BACKENDS


class SamplingSection(Section):
    """Rollout settings shared by `ppo` and `grpo` (see posttrain.rollout.SamplingParams)."""

    max_new_tokens: int = Field(64, gt=0, description="Completion length limit (tokens).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the loss uses the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (Holtzman et al. 2020).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (the completion text ends before them).")
    rollout_batch_size: int = Field(64, gt=0, description="Rows per generation batch inside the rollout engine.")
    backend: str = Field("hf", description=f"Rollout backend: one of posttrain.rollout.BACKENDS ({', '.join(BACKENDS)}).")
    merge_adapter: bool = Field(False, description="hf backend: sample through plain linear layers with the LoRA/DoRA "
                                "adapter folded in (W + s B A, built once per rollout): ~1.5x faster generation of a "
                                "LoRA policy on CPU (docs/benchmarks.md); the sampling log-probs differ from the "
                                "adapted model's by fp32 rounding (~1e-6), so it is off by default.")
    micro_batch_size: int = Field(16, gt=0, description="Rows per forward/backward pass of the update (memory knob; "
                                                       "does not change the result).")
    rewards: list[str] = Field(default_factory=list, description="Reward functions: built-in names "
                               "(posttrain.rewards.REWARDS), 'gym:TASK' (the task's verifier) or 'module:function'.")
    reward_weights: Optional[list[float]] = Field(None, description="One weight per reward function (default 1 each).")

    @model_validator(mode="after")
    def _check_weights(self) -> "SamplingSection":
        if self.reward_weights is not None and self.rewards and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")
        return self

    def reward_set(self, extra=()) -> RewardSet:
        """The configured reward functions plus Python ones passed to `run` (weight 1 each)."""
        weights = self.reward_weights
        if weights is not None and extra:
            weights = list(weights) + [1.0] * len(extra)
        return RewardSet([*self.rewards, *extra], weights)


def check_rl_run(cfg, key: str) -> None:
    """Config checks every RL stage shares: one micro-batch list per optimizer step comes from the rollout."""
    if cfg.train.grad_accum != 1:
        raise ValueError(f"{key}: train.grad_accum must be 1; set {key}.micro_batch_size to bound memory "
                         "(updates are split into micro-batches without changing the result)")
