"""What PPO and GRPO share: the sampling options, the rollouts they score (completions scored by
reward functions, or GRPO's multi-turn episodes rewarded by an environment; both run through
`posttrain.rollout.session`), and the reward-hacking monitor the engine runs after every step."""

from __future__ import annotations

import functools
import time
from typing import Callable, Literal, Optional

import torch
from pydantic import Field, model_validator

from posttrain.config import Section
from posttrain.engine.dist import all_reduce_sum, world_size
from posttrain.eval.hacking import DETECTORS, Finding, HackingMonitor, diversity
from posttrain.rewards.sets import RewardSet, resolve_reward
from posttrain.rollout import BACKENDS, Rollout
from posttrain.rollout.episodes import Episodes, resolve_environment
from posttrain.rollout.prompts import columns
from posttrain.rollout.session import RolloutSession

# `hacking_verifier`'s name for a multi-turn environment's outcome reward (`episode_outcome`)
ENVIRONMENT_VERIFIER = "environment"


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
        "often at weight 0 in `reward_weights`), or `environment` with grpo.environment (the environment's "
        "outcome reward, logged as episode_outcome: the reward of the turn at which it ended each episode, 0 for "
        "an episode cut off; per-turn shaping left out); the detector fires when the training reward rises while "
        "this score falls. Unset: that detector has nothing to compare and stays quiet.")
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
        return self

    def reward_set(self, extra=()) -> RewardSet:
        """The configured reward functions plus Python ones passed to `run` (weight 1 each)."""
        weights = self.reward_weights
        if weights is not None and extra:
            weights = list(weights) + [1.0] * len(extra)
        return RewardSet([*self.rewards, *extra], weights)


def check_rl_run(cfg, key: str, environment: Optional[str] = None) -> None:
    """Config checks every RL stage shares: one micro-batch list per optimizer step comes from the rollout;
    the reward-hacking verifier is a configured reward, or an `environment`'s outcome reward. With an
    environment (GRPO's multi-turn episodes) the environment rewards: no reward functions, and its name imports."""
    s = getattr(cfg, key)
    if cfg.train.grad_accum != 1:
        raise ValueError(f"{key}: train.grad_accum must be 1; set {key}.micro_batch_size to bound memory "
                         "(updates are split into micro-batches without changing the result)")
    if environment and s.rewards:
        raise ValueError(f"{key}.environment gives the episode reward: leave {key}.rewards empty")
    if environment:
        resolve_environment(environment)  # a name that does not import fails here, as a config error
    v = s.hacking_verifier
    if v == ENVIRONMENT_VERIFIER and not environment:
        raise ValueError(f"{key}.hacking_verifier=environment watches the outcome reward of a multi-turn environment "
                         f"(grpo.environment), and this run has none: name one of {key}.rewards {s.rewards}")
    if environment and v not in (None, ENVIRONMENT_VERIFIER):
        raise ValueError(f"{key}.hacking_verifier {v!r}: with {key}.environment the verifier is the environment's "
                         f"outcome reward: set {key}.hacking_verifier=environment")
    if v not in (None, ENVIRONMENT_VERIFIER) and v not in s.rewards:
        raise ValueError(f"{key}.hacking_verifier {v!r} is not one of rewards {s.rewards}: add it there (at weight 0 "
                         "in reward_weights to only watch it)")


def sample_and_score(session: RolloutSession, model, rows: list[dict], score: Callable, *,
                     group_size: int = 1) -> tuple[Rollout, torch.Tensor, dict]:
    """`group_size` completions per row, and `score(rollout, cols) -> (rewards [N], metrics)` of them, where
    `cols` repeats each row's dataset columns once per completion: (rollout, rewards, metrics), the
    metrics with the diversity the reward-hacking monitor watches, the completions' length, the scoring time."""
    ro = session.sample(model, rows)
    t0 = time.perf_counter()
    rewards, metrics = score(ro, {k: [v for v in vals for _ in range(group_size)] for k, vals in columns(rows).items()})
    return ro, rewards, {**metrics, **diversity(ro.completions, group_size), "scoring_time_s": time.perf_counter() - t0,
                         "completion_length": float(ro.completion_mask.sum(1).float().mean())}


class EpisodeGroups:
    """GRPO's samples with an environment: `section.num_generations` multi-turn episodes per row, of at
    most `section.max_turns` turns and `max_length` tokens, played against `section.environment` (built with
    `section.environment_args`; `rollout.episodes`) and rewarded by it.

    Metrics: `Episodes.metrics()` and `episode_outcome`, the mean outcome reward: the reward of the turn
    at which the environment ended each episode (0 for an episode cut off by max_turns, max_new_tokens or
    max_length), without the per-turn rewards before it. It is the environment's own verdict on the
    task, which `hacking_verifier=environment` compares with the training reward (shaping included).
    """

    def __init__(self, session: RolloutSession, section, max_length: Optional[int]):
        self.session, self.group_size, self.max_turns = session, section.num_generations, section.max_turns
        self.make_env = functools.partial(resolve_environment(section.environment), **section.environment_args)
        self.max_length = max_length

    def __call__(self, model, rows: list[dict]) -> tuple[Episodes, torch.Tensor, dict]:
        eps = self.session.play(model, rows, self.make_env, group_size=self.group_size, max_turns=self.max_turns,
                                max_length=self.max_length)
        outcome = [r[-1] if r and not cut else 0.0 for r, cut in zip(eps.turn_rewards, eps.truncated)]
        return eps, eps.rewards, {**eps.metrics(), "episode_outcome": sum(outcome) / max(1, len(outcome))}


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
        if section.hacking_verifier == ENVIRONMENT_VERIFIER:
            self.names["verifier"] = "episode_outcome"
        elif section.hacking_verifier is not None:  # the reward set logs each function's mean as reward/NAME
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


def hacking_checks(section: SamplingSection, steps_per_rollout: int, names: Optional[dict] = None) -> Callable:
    """`run_training`'s `make_checks`: the run's model -> [its HackingCheck]."""
    return lambda model: [HackingCheck(section, model, steps_per_rollout, names)]
