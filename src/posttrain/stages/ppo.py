"""Stage `ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Each batch of `train.batch_size` prompts is sampled once; the score (a trained reward model
and/or reward functions, minus a penalty when the completion has no EOS) lands on the last
token, a per-token KL penalty to the reference is subtracted from every token
(`posttrain.losses.token_rewards`), GAE(gamma, lambda) against a learned value model gives
advantages (whitened) and returns, and the rollout feeds `ppo.epochs x ppo.minibatches`
optimizer steps of the clipped policy loss + vf_coef x the clipped value loss.

The value model (`posttrain.models.value.ValueModel`) is registered inside the policy module,
so the engine's one optimizer and its checkpoints cover it; it is left out of the published
model. See docs/rl.md.
"""

from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from posttrain.config import RunConfig, register_stage_schema
from posttrain.engine.dist import unwrap
from posttrain.losses.rl import (
    explained_variance, gae, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss, token_rewards, whiten,
)
from posttrain.rollout import RolloutEngine, SamplingParams, completion_logprobs
from posttrain.stages import rl_common as rl
from posttrain.stages.common import RunResult, load_for_training, run_training

VALUE_ATTR = "ppo_value"


class PPOSection(rl.SamplingSection):
    reward_model: Optional[str] = Field(None, description="A reward model directory (stage `reward` output); its "
                                        "score of prompt + completion is the reward.")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score next to grpo-style "
                                       "reward functions (`rewards`).")
    value_model: Literal["policy", "reward"] = Field("policy", description="Trunk of the value model: a copy of the "
                                                     "starting policy, or the reward model.")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty (initial value when adaptive).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator in the reward.")
    target_kl: Optional[float] = Field(None, gt=0, description="Adaptive KL controller target (nats per sequence, "
                                       "Ziegler et al. 2019); None = fixed kl_coef.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller horizon (samples).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalize advantages over the rollout batch.")
    missing_eos_penalty: Optional[float] = Field(None, ge=0, description="Subtracted from the score of a completion "
                                                 "that hit max_new_tokens without EOS.")
    epochs: int = Field(4, gt=0, description="PPO epochs over each rollout batch.")
    minibatches: int = Field(1, gt=0, description="Optimizer steps per epoch (rows split evenly).")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    value_clip: float = Field(0.2, gt=0, description="Value clip range around the rollout-time values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")


class PPOConfig(RunConfig):
    stage: str = "ppo"
    ppo: PPOSection = Field(default_factory=PPOSection)

    @model_validator(mode="after")
    def _check_ppo(self) -> "PPOConfig":
        p = self.ppo
        if self.train.grad_accum != 1:
            raise ValueError("ppo: train.grad_accum must be 1; set ppo.micro_batch_size to bound memory")
        if p.value_model == "reward" and not p.reward_model:
            raise ValueError("ppo.value_model=reward needs ppo.reward_model (a reward model directory)")
        if p.minibatches > self.train.batch_size:
            raise ValueError(f"ppo.minibatches={p.minibatches} exceeds train.batch_size={self.train.batch_size}")
        return self


register_stage_schema("ppo", PPOConfig)


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

    KL is the batch's mean per-sequence KL to the reference and n its number of samples; with
    `target=None` beta stays fixed."""

    def __init__(self, init: float, target: Optional[float], horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon
        return self.value


class PPOStage:
    name = "ppo"

    def __init__(self, cfg: PPOConfig, tokenizer, reward_fns: Sequence[Callable] = ()):
        self.cfg, self.p, self.tokenizer = cfg, cfg.ppo, tokenizer
        specs = list(self.p.rewards) + list(reward_fns)
        if not specs and not self.p.reward_model:
            raise ValueError("ppo: no reward: set ppo.reward_model (a reward model directory) and/or ppo.rewards")
        weights = self.p.reward_weights
        if weights is not None and reward_fns:
            weights = list(weights) + [1.0] * len(reward_fns)
        self.rewards = rl.RewardSet(specs, weights) if specs else None
        self.steps_per_rollout = self.p.epochs * self.p.minibatches
        self.params = SamplingParams(max_new_tokens=self.p.max_new_tokens, temperature=self.p.temperature,
                                     top_p=self.p.top_p, top_k=self.p.top_k, stop=tuple(self.p.stop))
        self.kl_ctl = AdaptiveKLController(self.p.kl_coef, self.p.target_kl, self.p.kl_horizon)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self._engine: Optional[RolloutEngine] = None
        self._ref, self._ref_loaded, self._rm = None, False, None
        self._last_rollout_end: Optional[float] = None
        self.rollouts = 0

    def _reward_model(self, device):
        if self._rm is None and self.p.reward_model:
            from posttrain.models.reward import reward_model_from_lm

            rm, _ = reward_model_from_lm(self.p.reward_model, device=str(device))
            self._rm = rm.eval().requires_grad_(False)
            if self._rm.config.vocab_size != len(self.tokenizer) and self._rm.config.vocab_size < len(self.tokenizer):
                raise ValueError(f"ppo.reward_model {self.p.reward_model} has a {self._rm.config.vocab_size}-token "
                                 f"vocabulary but the policy's tokenizer has {len(self.tokenizer)}; the reward model "
                                 "must share the policy's tokenizer")
        return self._rm

    @torch.no_grad()
    def scores(self, model, ro, rows) -> tuple[torch.Tensor, dict]:
        """Per-completion score: reward model + weighted reward functions - missing-EOS penalty."""
        device = next(model.parameters()).device
        total = torch.zeros(len(ro))
        metrics: dict[str, float] = {}
        rm = self._reward_model(device)
        if rm is not None:
            from posttrain.models.reward import reward_scores

            s = reward_scores(rm, ro.input_ids.to(device), ro.attention_mask.to(device)).cpu()
            metrics["rm_score"] = float(s.mean())
            total += self.p.reward_model_weight * s
        if self.rewards is not None:
            r, m = self.rewards(ro.prompts, ro.completions, rl.columns(rows))
            total += r
            metrics.update(m)
        missing = ~ro.finished
        metrics["eos_missing_frac"] = float(missing.float().mean())
        if self.p.missing_eos_penalty:
            total = total - self.p.missing_eos_penalty * missing.float()
        return total, metrics

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        rows = batch["rows"]
        value = getattr(model, VALUE_ATTR)
        t0 = time.perf_counter()
        if self._engine is None or self._engine.model is not model:
            self._engine = RolloutEngine(model, self.tokenizer, backend=self.p.backend,
                                         batch_size=self.p.rollout_batch_size)
        self.params.seed = self.cfg.train.seed * 100_003 + self.rollouts
        self.rollouts += 1
        ro = self._engine.generate([r["_prompt"] for r in rows], self.params)
        t1 = time.perf_counter()
        score, metrics = self.scores(model, ro, rows)
        t2 = time.perf_counter()
        t = ro.batch()
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in t.items()}
        mask = t["completion_mask"].bool()
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), rl.autocast_for(self.cfg, device):
                if self.cfg.train.precision == "bf16":
                    t["logprobs"] = completion_logprobs(model, b, temperature=self.p.temperature).float().cpu()
                if not self._ref_loaded:
                    self._ref, self._ref_loaded = rl.load_reference(self.cfg, model), True
                with rl.reference_of(model, self._ref) as ref:
                    ref_logps = completion_logprobs(ref, b, temperature=self.p.temperature).float().cpu()
                values = value.completion_values(b).float().cpu()
        finally:
            model.train(was)
        kl = kl_penalty(t["logprobs"], ref_logps, estimator=self.p.kl_estimator)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        beta = self.kl_ctl.value
        rewards = token_rewards(score, kl, mask, kl_coef=beta)
        adv, returns = gae(rewards, values, mask, gamma=self.p.gamma, lam=self.p.lam)
        if self.p.whiten_advantages:
            adv = whiten(adv, mask)
        seq_kl = float(kl.sum(1).mean())
        self.kl_ctl.update(seq_kl, len(ro))
        t.update(advantages=adv, returns=returns, old_values=values, row=torch.arange(len(ro)))
        t3 = time.perf_counter()
        metrics.update({"score": float(score.mean()), "kl": seq_kl, "kl_coef": beta,
                        "non_score_reward": float((-beta * kl).sum(1).mean()),
                        "explained_variance": float(explained_variance(values, returns, mask)),
                        "completion_length": float(mask.sum(1).float().mean()),
                        "rollout_time_s": t1 - t0, "scoring_time_s": t2 - t1, "ref_value_time_s": t3 - t2,
                        "rollout_tokens_per_s": ro.tokens_per_s})
        if self._last_rollout_end is not None:  # the previous rollout's optimizer steps
            metrics["update_time_s"] = t0 - self._last_rollout_end
        steps = []
        for _ in range(self.p.epochs):
            for part in rl.minibatch_indices(len(ro), self.p.minibatches, self.gen):
                steps.append(rl.micro_batches(t, part, self.p.micro_batch_size, extra={"rollout_metrics": metrics}))
        self._last_rollout_end = time.perf_counter()
        self.last_rollout = ro
        return steps

    def loss(self, model, batch: dict):
        mask = batch["completion_mask"].bool()
        logps, entropy = completion_logprobs(model, batch, temperature=self.p.temperature, with_entropy=True)
        # under DDP the value head sits on the wrapped module; its gradients are still all-reduced
        values = getattr(unwrap(model), VALUE_ATTR).completion_values(batch)
        pl, clipfrac = ppo_policy_loss(logps, batch["logprobs"], batch["advantages"], mask, clip=self.p.clip)
        vl = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=self.p.value_clip)
        loss = pl + self.p.vf_coef * vl
        with torch.no_grad():
            u = torch.where(mask, batch["logprobs"] - logps, torch.zeros_like(logps))
            m = {"policy_loss": float(pl), "value_loss": float(vl), "clip_frac": float(clipfrac),
                 "entropy": float(masked_mean(entropy, mask)),
                 "approx_kl_old": float(masked_mean(0.5 * u ** 2, mask)), **batch["rollout_metrics"]}
        return loss * self.num_loss_units(batch), m

    def num_loss_units(self, batch: dict) -> int:
        return int(batch["completion_mask"].sum())


def prepare_model(cfg: PPOConfig, model=None, tokenizer=None):
    """The policy (full or adapter) with its value model attached under `ppo_value`."""
    from posttrain.models.value import ValueModel, attach_value_model
    from posttrain.models.loading import resolve_device

    if model is None:
        model, tokenizer = load_for_training(cfg)
    if not hasattr(model, VALUE_ATTR):
        src = cfg.ppo.reward_model if cfg.ppo.value_model == "reward" else cfg.model
        vm = ValueModel.from_pretrained(src, device=resolve_device(cfg.train.device),
                                        trust_remote_code=cfg.trust_remote_code, seed=cfg.train.seed)
        attach_value_model(model, vm, VALUE_ATTR)
    return model, tokenizer


def run(cfg: PPOConfig, *, resume: bool = False, reward_fns: Sequence[Callable] = (), model=None, tokenizer=None,
        **kw) -> RunResult:
    """Train with PPO. `reward_fns` add Python reward functions to the reward model's score."""
    if cfg.stage != "ppo" or not isinstance(cfg, PPOConfig):
        raise ValueError(f"ppo.run needs a ppo config (load_config('ppo', ...)), got stage {cfg.stage!r}")
    model, tokenizer = prepare_model(cfg, model, tokenizer)
    return run_training(cfg, lambda tok: PPOStage(cfg, tok, reward_fns), rl.prompt_data, resume=resume,
                        model=model, tokenizer=tokenizer, **kw)


# ------------------------------------------------------------------ gym / demo


def held_out_rm_score(policy, tokenizer, rm, prompts: list[str], *, max_new_tokens: int = 32, n: int = 2,
                      seed: int = 1, reference=None) -> dict:
    """Mean reward-model score of sampled completions of `prompts`, and (with `reference`) the mean
    per-completion KL(policy || reference), k1 on those samples."""
    from posttrain.models.reward import reward_scores

    ro = RolloutEngine(policy, tokenizer).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, n=n,
                                                                           seed=seed))
    out = {}
    with torch.no_grad():
        out["rm_score"] = float(reward_scores(rm, ro.input_ids, ro.attention_mask).mean())
        if reference is not None:
            b = ro.batch()
            d = (completion_logprobs(policy, b) - completion_logprobs(reference, b)) * b["completion_mask"]
            out["kl"] = float(d.sum(1).mean())
    return out


DEMO_OVERRIDES = ["train.batch_size=16", "train.lr=2e-4", "train.warmup_steps=0", "ppo.max_new_tokens=32",
                  "ppo.kl_coef=0.05", "ppo.target_kl=6.0", "ppo.kl_horizon=1000"]


def demo_stage(start_model, out_dir, *, rm_steps: int = 60, ppo_steps: int = 80, n_eval: int = 64,
               reward_model: Optional[str] = None, extra_overrides: Sequence[str] = ()) -> dict:
    """The demo's `ppo` row: train a reward model on gym:preference (stage `reward`), then PPO from
    `start_model` against it on the preference prompts (`reward_model`: reuse a trained one instead).

    Returns {"rm_score_before", "rm_score", "gain", "kl", "train_time_s", "rm_dir", "run_dir", "model_dir"};
    scores and KL are measured on samples for `n_eval` held-out (validation) prompts.
    """
    from pathlib import Path

    from posttrain import gym
    from posttrain.config import load_config
    from posttrain.models.loading import load
    from posttrain.models.reward import reward_model_from_lm
    from posttrain.stages import reward

    out = Path(out_dir)
    rm_dir = reward_model
    if rm_dir is None:
        rm_cfg = load_config("reward", overrides=[
            f"model={start_model}", "data.train=gym:preference", f"output_dir={out / 'rm'}", "train.lr=1e-4",
            "train.batch_size=16", f"train.max_steps={rm_steps}", "train.warmup_steps=5", "train.progress=false",
            "data.max_length=128"])
        rm_dir = reward.run(rm_cfg).model_dir
    rm, _ = reward_model_from_lm(rm_dir, device="cpu")
    rm.eval()
    start, tok = load(start_model, device="cpu")
    prompts = [rl.prompt_text(tok, r) for r in gym.load_task_rows("preference", "validation", n=n_eval)]
    before = held_out_rm_score(start.eval(), tok, rm, prompts)
    cfg = load_config("ppo", overrides=[
        f"model={start_model}", "data.train=gym:preference", f"output_dir={out / 'ppo'}", f"ppo.reward_model={rm_dir}",
        f"train.max_steps={ppo_steps}", "train.progress=false", *DEMO_OVERRIDES, *extra_overrides])
    t0 = time.time()
    res = run(cfg)
    train_time = time.time() - t0
    after = held_out_rm_score(res.model.eval(), tok, rm, prompts, reference=start)
    return {"rm_score_before": round(before["rm_score"], 4), "rm_score": round(after["rm_score"], 4),
            "gain": round(after["rm_score"] - before["rm_score"], 4), "kl": round(after["kl"], 4),
            "train_time_s": round(train_time, 1), "rm_dir": str(rm_dir), "run_dir": str(out / "ppo"),
            "model_dir": str(res.model_dir)}
