"""Reward functions by name, and several of them weighted into one reward (PPO, GRPO, self-rejected DPO)."""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Sequence, Union

import torch

from posttrain import gym
from posttrain.rewards import get_reward
from posttrain.models.reward import reward_model_from_lm, reward_scores
from posttrain.rewards.base import RewardFn


def resolve_reward(spec: Union[str, Callable]) -> tuple[str, RewardFn]:
    """(name, function) from a built-in name, 'module:function', 'gym:TASK' (the task's verifier) or a callable."""


    if callable(spec):
        return getattr(spec, "__name__", "reward"), spec
    if spec.startswith("gym:"):
        return f"gym_{spec[4:]}", gym.verifier_reward(spec[4:])
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            return fn, getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import it ({e})") from None
    return spec, get_reward(spec)


class RewardSet:
    """Several reward functions with weights: r = sum_k w_k r_k over the applicable ones (None skipped).

    A row for which no function applies scores 0 and is counted in `reward_none`.
    """

    def __init__(self, specs: Sequence[Union[str, Callable]], weights: Optional[Sequence[float]] = None):
        self.fns = [resolve_reward(s) for s in specs]
        if weights is not None and len(weights) != len(self.fns):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.fns)} reward functions")
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]

    def __len__(self) -> int:
        return len(self.fns)

    def __call__(self, prompts: list, completions: list[str], cols: dict) -> tuple[torch.Tensor, dict]:
        """(total reward per completion [N], metrics: each function's mean as `reward/NAME`, `reward_none`)."""
        total = [0.0] * len(completions)
        applied = [False] * len(completions)
        metrics: dict[str, float] = {}
        for (name, fn), w in zip(self.fns, self.weights):
            vals = fn(prompts, completions, **cols)
            if len(vals) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(vals)} values for {len(completions)} completions")
            got = [float(v) for v in vals if v is not None]
            if any(not math.isfinite(v) for v in got):
                raise ValueError(f"reward {name!r} returned a non-finite value")
            metrics[f"reward/{name}"] = sum(got) / len(got) if got else float("nan")
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += w * float(v)
                    applied[i] = True
        metrics["reward_none"] = float(sum(not a for a in applied))
        return torch.tensor(total), metrics


class SequenceScorer:
    """PPO's score of each completion: a reward model's score (weighted) plus reward functions, minus a
    penalty when the completion hit the length limit without EOS.

    The reward model is loaded on first use and must share the policy's tokenizer.
    """

    def __init__(self, tokenizer, *, reward_model: Optional[str] = None, reward_model_weight: float = 1.0,
                 rewards: Optional[RewardSet] = None, missing_eos_penalty: Optional[float] = None):
        self.tokenizer, self.path, self.weight = tokenizer, reward_model, reward_model_weight
        self.rewards, self.penalty = rewards, missing_eos_penalty
        self._rm = None

    def reward_model(self, device):
        if self._rm is None and self.path:
            rm, _ = reward_model_from_lm(self.path, device=str(device))
            self._rm = rm.eval().requires_grad_(False)
            if self._rm.config.vocab_size < len(self.tokenizer):
                raise ValueError(f"ppo.reward_model {self.path} has a {self._rm.config.vocab_size}-token vocabulary "
                                 f"but the policy's tokenizer has {len(self.tokenizer)}; the reward model must share "
                                 "the policy's tokenizer")
        return self._rm

    @torch.no_grad()
    def __call__(self, ro, cols: dict, device) -> tuple[torch.Tensor, dict]:
        """(score per completion [N], metrics) of a rollout `ro`; `cols` are the rows' dataset columns."""
        total, metrics = torch.zeros(len(ro)), {}
        rm = self.reward_model(device)
        if rm is not None:
            s = reward_scores(rm, ro.input_ids.to(device), ro.attention_mask.to(device)).cpu()
            metrics["rm_score"] = float(s.mean())
            total += self.weight * s
        if self.rewards is not None:
            r, m = self.rewards(ro.prompts, ro.completions, cols)
            total, metrics = total + r, {**metrics, **m}
        missing = ~ro.finished
        metrics["eos_missing_frac"] = float(missing.float().mean())
        if self.penalty:
            total = total - self.penalty * missing.float()
        return total, metrics


class AdaptiveKLController:
    """The KL coefficient of PPO's reward (Ziegler et al. 2019):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

    KL is the batch's mean per-sequence KL to the reference and n its number of samples; with
    `target=None` beta stays fixed."""

    def __init__(self, init: float, target: Optional[float], horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon
        return self.value
