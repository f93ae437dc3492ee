"""Stage `grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

Each batch of `train.batch_size` prompts is sampled G = `grpo.num_generations` times, scored by
the reward functions, and each completion's advantage is its reward relative to its group
(`posttrain.losses.grpo_advantages`). The rollout then feeds `iterations x minibatches` optimizer
steps of the clipped surrogate `posttrain.losses.grpo_loss` (with an optional k3 KL to the
reference). No critic. See docs/rl.md.
"""

from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from posttrain.config import RunConfig, register_stage_schema
from posttrain.losses.rl import grpo_advantages, grpo_loss, masked_mean, zero_variance_groups
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logprobs
from posttrain.stages import rl_common as rl
from posttrain.stages.common import RunResult, run_training


class GRPOSection(rl.SamplingSection):
    num_generations: int = Field(4, ge=2, description="G: completions per prompt (a group).")
    scale: Literal["group", "none"] = Field("group", description="Divide advantages by the group's reward std "
                                            "(GRPO) or not (Dr. GRPO, Liu et al. 2025).")
    aggregation: rl.Aggregation = Field("grpo", description="Token weighting: grpo (mean of sequence means), "
                                        "dr_grpo (sum / (B * max_new_tokens)), dapo (mean over all tokens).")
    eps_low: float = Field(0.2, ge=0, lt=1, description="Lower clip range of the ratio.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip range (DAPO's clip-higher uses 0.28).")
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to the reference (0 = no reference pass).")
    iterations: int = Field(1, gt=0, description="mu: update passes over each generation batch.")
    minibatches: int = Field(1, gt=0, description="Optimizer steps per pass (the batch's rows split evenly).")
    mask_truncated: bool = Field(False, description="Completions that hit max_new_tokens get no loss (DAPO's "
                                 "overlong filtering).")
    skip_zero_advantage: bool = Field(True, description="Leave rows whose advantage is exactly 0 (zero-variance "
                                      "groups) out of the update's forward/backward passes when beta = 0: their "
                                      "loss and gradient are 0, and they still count in the normalization, so the "
                                      "gradient is unchanged.")


class GRPOConfig(RunConfig):
    stage: str = "grpo"
    grpo: GRPOSection = Field(default_factory=GRPOSection)

    @model_validator(mode="after")
    def _check_grpo(self) -> "GRPOConfig":
        if self.train.grad_accum != 1:
            raise ValueError("grpo: train.grad_accum must be 1; set grpo.micro_batch_size to bound memory "
                             "(updates are split into micro-batches without changing the result)")
        if self.grpo.minibatches > self.train.batch_size * self.grpo.num_generations:
            raise ValueError(f"grpo.minibatches={self.grpo.minibatches} exceeds the rows of a generation batch "
                             f"(train.batch_size x grpo.num_generations = "
                             f"{self.train.batch_size * self.grpo.num_generations})")
        if self.grpo.reward_weights is not None and self.grpo.rewards and \
                len(self.grpo.reward_weights) != len(self.grpo.rewards):
            raise ValueError(f"grpo.reward_weights has {len(self.grpo.reward_weights)} values for "
                             f"{len(self.grpo.rewards)} grpo.rewards")
        return self


register_stage_schema("grpo", GRPOConfig)


class GRPOStage:
    name = "grpo"

    def __init__(self, cfg: GRPOConfig, tokenizer, reward_fns: Sequence[Callable] = ()):
        self.cfg, self.g, self.tokenizer = cfg, cfg.grpo, tokenizer
        specs = list(self.g.rewards) + list(reward_fns)
        if not specs:
            raise ValueError("grpo: no reward functions: set grpo.rewards (e.g. [math]) or pass reward_fns")
        weights = self.g.reward_weights
        if weights is not None and reward_fns:
            weights = list(weights) + [1.0] * len(reward_fns)
        self.rewards = rl.RewardSet(specs, weights)
        self.steps_per_rollout = self.g.iterations * self.g.minibatches
        self.params = SamplingParams(max_new_tokens=self.g.max_new_tokens, temperature=self.g.temperature,
                                     top_p=self.g.top_p, top_k=self.g.top_k, stop=tuple(self.g.stop),
                                     n=self.g.num_generations)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self._engine: Optional[RolloutEngine] = None
        self._ref = None
        self._ref_loaded = False
        self._last_rollout_end: Optional[float] = None
        self.rollouts = 0

    # ------------------------------------------------------------ rollout -> optimizer steps

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        rows = batch["rows"]
        t0 = time.perf_counter()
        if self._engine is None or self._engine.model is not model:
            self._engine = RolloutEngine(model, self.tokenizer, backend=self.g.backend,
                                         batch_size=self.g.rollout_batch_size)
        self.params.seed = self.cfg.train.seed * 100_003 + self.rollouts
        self.rollouts += 1
        ro = self._engine.generate([r["_prompt"] for r in rows], self.params)
        t1 = time.perf_counter()
        G = self.g.num_generations
        cols = {k: [v for v in vals for _ in range(G)] for k, vals in rl.columns(rows).items()}
        rewards, rmetrics = self.rewards(ro.prompts, ro.completions, cols)
        t2 = time.perf_counter()
        adv = grpo_advantages(rewards, G, scale=self.g.scale)
        zero_var = zero_variance_groups(rewards, G)
        t = ro.batch()
        if self.g.mask_truncated:
            t["completion_mask"] = t["completion_mask"] * ro.finished[:, None].long()
        t["advantages"] = adv
        t.update(self._extra_logps(model, t))
        t3 = time.perf_counter()
        lengths = ro.completion_mask.sum(1).float()
        metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                   **{k: v for k, v in rmetrics.items()},
                   "zero_variance_groups": float(zero_var.sum()), "zero_variance_frac": float(zero_var.float().mean()),
                   "completion_length": float(lengths.mean()), "truncated_frac": float((~ro.finished).float().mean()),
                   "rollout_time_s": t1 - t0, "scoring_time_s": t2 - t1, "ref_time_s": t3 - t2,
                   "rollout_tokens_per_s": ro.tokens_per_s}
        if self._last_rollout_end is not None:  # the previous rollout's optimizer steps
            metrics["update_time_s"] = t0 - self._last_rollout_end
        steps = []
        for _ in range(self.g.iterations):
            for part in rl.minibatch_indices(len(ro), self.g.minibatches, self.gen):
                keep, skipped_units = self._informative(part, t)
                micro = rl.micro_batches(t, keep, self.g.micro_batch_size, extra={"rollout_metrics": metrics})
                micro[0]["skipped_units"] = skipped_units
                steps.append(micro)
        self._last_rollout_end = time.perf_counter()
        self.last_rollout = ro
        return steps

    def _informative(self, part: torch.Tensor, t: dict) -> tuple[torch.Tensor, int]:
        """The rows of `part` that the update must run, and the loss units of those it may leave out.

        With beta = 0 a row whose advantage is exactly 0 has loss 0 and gradient 0 (the surrogate is
        ratio x 0), so it need not be run; it still counts in the normalization (`skipped_units`),
        which keeps the step's gradient identical. At least one row is kept.
        """
        if not self.g.skip_zero_advantage or self.g.beta > 0:
            return part, 0
        zero = t["advantages"][part] == 0
        if bool(zero.all()):
            zero[0] = False
        skipped = part[zero]
        if self.g.aggregation == "dapo":
            units = int(t["completion_mask"][skipped].sum())
        else:
            units = len(skipped)
        return part[~zero], units

    @torch.no_grad()
    def _extra_logps(self, model, t: dict) -> dict:
        """Old log-probs recomputed under bf16 autocast (so the first ratio is exactly 1 in the training
        precision) and reference log-probs when beta > 0. In fp32 the sampling-time log-probs are used
        as they are: they match a training pass within the bound tested in tests/rollout."""
        out = {}
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}
        was = model.training
        model.eval()
        try:
            with rl.autocast_for(self.cfg, device):
                if self.cfg.train.precision == "bf16":
                    out["logprobs"] = completion_logprobs(model, b, temperature=self.g.temperature).float().cpu()
                if self.g.beta > 0:
                    if not self._ref_loaded:
                        self._ref, self._ref_loaded = rl.load_reference(self.cfg, model), True
                    with rl.reference_of(model, self._ref) as ref:
                        out["ref_logps"] = completion_logprobs(ref, b, temperature=self.g.temperature).float().cpu()
        finally:
            model.train(was)
        return out

    # ------------------------------------------------------------ loss

    def loss(self, model, batch: dict):
        logps, entropy = completion_logprobs(model, batch, temperature=self.g.temperature, with_entropy=True)
        mask = batch["completion_mask"].bool()
        loss = grpo_loss(logps, batch["logprobs"], batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                         beta=self.g.beta, eps_low=self.g.eps_low, eps_high=self.g.eps_high,
                         aggregation=self.g.aggregation, max_completion_length=self.g.max_new_tokens)
        with torch.no_grad():
            ratio = torch.exp(torch.where(mask, logps - batch["logprobs"], torch.zeros_like(logps)))
            adv = batch["advantages"][:, None].expand_as(ratio)
            clipped = ((ratio < 1 - self.g.eps_low) & (adv < 0)) | ((ratio > 1 + self.g.eps_high) & (adv > 0))
            m = {"entropy": float(masked_mean(entropy, mask)), "clip_frac": float(masked_mean(clipped.float(), mask)),
                 **batch["rollout_metrics"]}
            if "ref_logps" in batch:
                u = batch["ref_logps"] - logps
                m["kl"] = float(masked_mean(torch.expm1(u) - u, mask))
        return loss * self._own_units(batch), m

    def _own_units(self, batch: dict) -> int:
        # grpo and dr_grpo are means over sequences; dapo is a mean over tokens
        if self.g.aggregation == "dapo":
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    def num_loss_units(self, batch: dict) -> int:
        """This micro-batch's units plus those of the zero-advantage rows left out of its step."""
        return self._own_units(batch) + int(batch.get("skipped_units", 0))


def run(cfg: GRPOConfig, *, resume: bool = False, reward_fns: Sequence[Callable] = (), **kw) -> RunResult:
    """Train with GRPO. `reward_fns` add Python reward functions to the configured `grpo.rewards`."""
    if cfg.stage != "grpo" or not isinstance(cfg, GRPOConfig):
        raise ValueError(f"grpo.run needs a grpo config (load_config('grpo', ...)), got stage {cfg.stage!r}")
    return run_training(cfg, lambda tok: GRPOStage(cfg, tok, reward_fns), rl.prompt_data, resume=resume, **kw)


# ------------------------------------------------------------------ gym / demo


def gym_reward(task: str) -> Callable:
    """The gym task's own verifier as a 0/1 reward function (dataset columns rebuild the row)."""
    from posttrain import gym

    return gym.verifier_reward(task)
