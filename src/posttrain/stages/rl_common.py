"""What PPO and GRPO share: the sampling options (their rollouts run through
`posttrain.rollout.session`) and the reward-hacking monitor the engine runs after every step."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from posttrain.config import Section
from posttrain.engine.dist import all_reduce_sum, world_size
from posttrain.eval.hacking import DETECTORS, Finding, HackingMonitor
from posttrain.rewards.sets import RewardSet, resolve_reward
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
    hacking_stop_on: list[Literal[DETECTORS]] = Field(
        default_factory=list, description="Reward-hacking detectors (posttrain.eval.hacking; docs/eval.md) whose "
        "firing stops the run and rolls back to the last rollout at which none had fired: reward_vs_verifier, "
        "length_drift, component_divergence, diversity_collapse, kl_bound. Empty (default): every detector runs "
        "and only warns.")
    hacking_verifier: Optional[str] = Field(
        None, description="reward_vs_verifier: one of `rewards` that checks the task itself (e.g. gym:reasoning, "
        "often at weight 0 in `reward_weights`); the detector fires when the training reward rises while this "
        "score falls. Unset: that detector has nothing to compare and stays quiet.")
    hacking_window: int = Field(5, gt=0, description="Rollouts averaged at the start and at the end of a change; a "
                                "detector needs 2 x this many rollouts before it can fire.")
    hacking_max_length_factor: float = Field(2.0, gt=1, description="length_drift: the mean completion length may "
                                             "grow or shrink by this factor from its start.")
    hacking_max_kl: float = Field(0.5, gt=0, description="kl_bound: mean KL to the reference over the last "
                                  "`hacking_window` rollouts, nats per token.")

    @model_validator(mode="after")
    def _check_weights(self) -> "SamplingSection":
        if self.reward_weights is not None and self.rewards and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")
        if self.hacking_verifier is not None and self.hacking_verifier not in self.rewards:
            raise ValueError(f"hacking_verifier {self.hacking_verifier!r} is not one of rewards {self.rewards}: "
                             "add it there (at weight 0 in reward_weights to only watch it)")
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


class HackingCheck:
    """The reward-hacking monitor (`eval.hacking.HackingMonitor`) as an engine `StepCheck`.

    It reads each rollout's metrics once, at the rollout's last optimizer step (so `hacking_window`
    counts rollouts), averaged over processes so that every rank takes the same decision; it logs
    `hack/<detector>` (1 once fired) with the training metrics, warns once per detector, and stops
    the run when a detector in `hacking_stop_on` fires. Then it restores the trainable weights of the
    last rollout at which no detector had fired: with `hacking_stop_on` set they are copied to the
    CPU after every clean rollout (a few MB for LoRA, a copy of the weights for full fine-tuning).
    `names` maps the monitor's metric names to the stage's (PPO: its score is the reward, its KL per
    token the KL).
    """

    name = "hacking"
    split = "train"

    def __init__(self, section: SamplingSection, model, steps_per_rollout: int, names: Optional[dict] = None):
        stop_on = tuple(section.hacking_stop_on)
        self.every = steps_per_rollout
        self.names = {"reward": "reward", "completion_length": "completion_length", "kl": "kl",
                      "distinct_2": "distinct_2", "identical_share": "identical_share",
                      "zero_variance_frac": "zero_variance_frac", "truncated_frac": "truncated_frac",
                      "verifier": "verifier", **(names or {})}
        if section.hacking_verifier is not None:  # the reward set logs each function's mean as reward/NAME
            self.names["verifier"] = f"reward/{resolve_reward(section.hacking_verifier)[0]}"
        self.monitor = HackingMonitor(window=section.hacking_window, max_length_factor=section.hacking_max_length_factor,
                                      max_kl=section.hacking_max_kl, stop_on=stop_on,
                                      model=model if stop_on else None, snapshot_every=steps_per_rollout)

    def after_step(self, model, step: int, total_steps: int, metrics: dict) -> tuple[dict, Optional[str]]:
        if step % self.every:
            return self.monitor.metrics(), None
        seen = {ours: metrics[theirs] for ours, theirs in self.names.items() if theirs in metrics}
        seen.update({k: v for k, v in metrics.items() if k.startswith("reward/")})
        if world_size() > 1:  # each rank samples its own prompts: decide on the mean of all
            keys = sorted(seen)
            mean = all_reduce_sum(torch.tensor([float(seen[k]) for k in keys], dtype=torch.float64)) / world_size()
            seen = dict(zip(keys, mean.tolist()))
        reason = self.monitor.update(step, seen)
        return self.monitor.metrics(), reason

    def state_dict(self) -> dict:
        """The metric history and the first firing of each detector (the roll-back target is not
        checkpointed: after a resume it is the first clean rollout again)."""
        return {"history": self.monitor.history,
                "fired": {d: [s, f.value, f.limit, f.message] for d, (s, f) in self.monitor.fired.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.monitor.history = {k: list(v) for k, v in state.get("history", {}).items()}
        self.monitor.fired = {d: (s, Finding(d, v, lim, msg)) for d, (s, v, lim, msg) in state.get("fired", {}).items()}

    def summary(self) -> dict:
        """Each detector that fired: the step and its message; and which detectors stop the run."""
        return {"fired": {d: {"step": s, "message": f.message} for d, (s, f) in self.monitor.fired.items()},
                "stop_on": list(self.monitor.stop_on), "rollouts": len(self.monitor.history.get("reward", []))}
