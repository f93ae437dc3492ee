"""The one training loop that every stage runs on.

A stage says what a batch is and what its loss is; this loop owns the rest:
optimizer and schedule, gradient accumulation with token-level normalization,
precision, evaluation and early stopping, checkpoints and resume, logging, and
failure handling.

Token-level normalization: a stage returns the *sum* of its per-unit losses and
the number of units (loss tokens for SFT, pairs for DPO). For one optimizer step
the engine first counts the units of every micro-batch (and all-reduces the count
across ranks), then back-propagates sum_i / total for each micro-batch. The
gradient is therefore that of the mean over every unit of the step, exactly as
one large batch would give, however the units are split into micro-batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from posttrain.config import RunConfig
from posttrain.engine import checkpoint as ckpt
from posttrain.engine.dist import all_reduce_sum, rank, rollout_view, world_size
from posttrain.engine.monitor import Monitor
from posttrain.engine.optim import build_optimizer, build_scheduler, schedule_length
from posttrain.engine.precision import autocast
from posttrain.engine.sampler import BatchSampler


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, empty data, ...); the message says what and where."""


class Stage(Protocol):
    """What a training stage gives the engine: its loss over a batch, and the units it summed over."""

    name: str

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(sum of per-unit losses as a scalar tensor, metrics to log)."""

    def num_loss_units(self, batch: dict) -> int:
        """How many units `loss` summed over (tokens, pairs, ...)."""


@runtime_checkable
class RolloutStage(Stage, Protocol):
    """An RL stage: each batch of prompts becomes a rollout that feeds `steps_per_rollout` optimizer
    steps. `state_dict`/`load_state_dict` carry its sampling counters and RNGs through a checkpoint,
    so a resumed run draws the same rollouts (the engine checkpoints the rollout's pending steps)."""

    steps_per_rollout: int

    def rollout(self, model, batch: dict) -> list[list[dict]]:
        """The micro-batches of every optimizer step this rollout feeds (iterations x minibatches)."""

    def state_dict(self) -> dict:
        """Counters and RNG states (tensors, numbers, lists, dicts)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


@runtime_checkable
class StepCheck(Protocol):
    """A check the engine runs after every optimizer step: the default forgetting guard
    (`eval.guard.DriftGuard`), the RL reward-hacking monitor (`stages.rl_common.HackingCheck`).

    `after_step` gets the model, the step just taken, the run's total steps and that step's training
    metrics, and returns (metrics to log under `split`, or {}; a stop reason, or None). A check that
    stops the run has already restored the weights it trusts, so the engine publishes them as they
    are (and does not restore its loss-based best over them). `state_dict` goes into every
    checkpoint's trainer state (JSON numbers, lists and dicts), so a resumed run's checks go on
    from where they were.
    """

    name: str   # its summary's key in the run's result (manifest.json)
    split: str  # where its metrics are logged: "eval" (a line of their own) or "train" (with the step's)

    def after_step(self, model, step: int, total_steps: int, metrics: dict) -> tuple[dict, Optional[str]]:
        """(metrics to log, stop reason or None)."""

    def state_dict(self) -> dict:
        """What a resumed run needs (JSON-serialisable)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def summary(self) -> dict:
        """What the run's result records about this check (JSON)."""


@dataclass
class TrainData:
    """What the engine needs from a data pipeline: items and a collate function, plus the held-out
    evaluators that come with the data (`(model, step) -> dict`, run at each evaluation)."""

    train: Sequence[Any]
    collate: Callable[[list], dict]
    eval: Optional[Sequence[Any]] = None
    stats: dict = field(default_factory=dict)
    hashes: dict = field(default_factory=dict)  # input file -> sha256, for the run manifest
    evaluators: list = field(default_factory=list)


def move_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Engine:
    """Runs `stage` on `model` with `data` under `cfg.train`; writes into `cfg.output_dir`.

    Hooks:
        evaluators: callables `(model, step) -> dict` run at each evaluation
            (e.g. task accuracy, the regression suite); their metrics are logged
            with split "eval".
        guard: optional callable `(eval_metrics) -> str | None`; a non-None string
            stops the run (the regression-suite guard). The guard restores the weights it trusts
            itself, and the loss-based best checkpoint is then not restored over them.
        checks: `StepCheck`s run after every optimizer step (the default drift guard, the
            reward-hacking monitor); one that returns a reason stops the run the same way.
    """

    def __init__(self, model: torch.nn.Module, stage: Stage, data: TrainData, cfg: RunConfig, *,
                 evaluators: Sequence[Callable] = (), guard: Optional[Callable[[dict], Optional[str]]] = None,
                 checks: Sequence[StepCheck] = (), device: Optional[torch.device] = None):
        self.model = model
        self.stage = stage
        self.data = data
        self.cfg = cfg
        self.t = cfg.train
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.evaluators = [*data.evaluators, *evaluators]
        self.guard = guard
        self.checks = list(checks)
        self.device = device or next(model.parameters()).device
        self.sampler = BatchSampler(len(data.train), self.t.batch_size, seed=self.t.seed,
                                    rank=rank(), world_size=world_size())
        self.total_steps = self._total_steps()
        self.schedule_steps = schedule_length(self.t.schedule_steps, self.total_steps)  # the lr schedule's length
        self.step = 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.stop_reason: Optional[str] = None
        self.guard_fired = False
        self.tokens_seen = 0
        self.history: list[dict] = []
        self._pending: list[list[dict]] = []  # optimizer steps left from the last rollout (RL stages)

    # ------------------------------------------------------------ set-up

    def _total_steps(self) -> int:
        if self.t.max_steps:
            return self.t.max_steps
        micro = math.ceil(self.t.epochs * self.sampler.batches_per_epoch)
        if isinstance(self.stage, RolloutStage):
            return max(1, micro * int(self.stage.steps_per_rollout))
        return max(1, math.ceil(micro / self.t.grad_accum))

    def _warmup(self) -> int:
        if self.t.warmup_steps is not None:
            return self.t.warmup_steps
        return int(self.t.warmup_ratio * self.schedule_steps)

    def _autocast(self):
        return autocast(self.t.precision, self.device)

    def _state(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "best": self.best,
                "bad_evals": self.bad_evals, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "seed": self.t.seed, "checks": [c.state_dict() for c in self.checks]}

    # ------------------------------------------------------------ the loop

    def fit(self, resume: bool = False, trust_checkpoint: bool = False) -> dict:
        torch.manual_seed(self.t.seed + rank())
        model = self.model
        self.optimizer = build_optimizer(model, lr=self.cfg.default_lr(), weight_decay=self.t.weight_decay,
                                         betas=self.t.adam_betas, eps=self.t.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, schedule=self.t.schedule, warmup=self._warmup(),
                                         total=self.schedule_steps)
        resumed_from = None
        if resume:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            if last is not None:
                st = ckpt.load_checkpoint(last, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
                                          trust=trust_checkpoint)
                self.step, self.best, self.bad_evals = st["step"], st["best"], st["bad_evals"]
                self.tokens_seen = st.get("tokens_seen", 0)
                self.sampler.load_state_dict(st["sampler"])
                for c, cs in zip(self.checks, st.get("checks") or []):
                    c.load_state_dict(cs)
                if isinstance(self.stage, RolloutStage) and st.get("stage_state"):
                    # the rollout's pending steps and the sampling counters: the next steps are the same
                    self.stage.load_state_dict(st["stage_state"]["stage"])
                    self._pending = st["stage_state"]["pending"]
                resumed_from = self.step
        mon = Monitor(self.out, total_steps=self.total_steps, progress=self.t.progress,
                      report_to=tuple(self.t.report_to), resume_step=resumed_from, run_name=self.stage.name)
        self.monitor = mon
        if resumed_from is not None:
            mon.write(f"posttrain: resumed from step {resumed_from} ({last})")
        if self.data.stats and resumed_from is None:
            mon.log(0, "data", {k: v for k, v in self.data.stats.items() if isinstance(v, (int, float))})
        model.train()
        t_start = time.time()
        try:
            while self.step < self.total_steps:
                metrics = self._train_step()
                self.step += 1
                self._run_checks(metrics)
                if self.step % self.t.log_every == 0 or self.step == self.total_steps:
                    mon.log(self.step, "train", metrics)
                mon.progress(1, loss=metrics["loss"], tok_s=metrics["tokens_per_s"])
                if self.t.eval_every and (self.step % self.t.eval_every == 0 or self.step == self.total_steps):
                    self._evaluate_and_maybe_stop()
                if self.t.save_every and self.step % self.t.save_every == 0 and self.step < self.total_steps \
                        and not self.stop_reason:  # a stopped run's weights are published, not resumed
                    self._save(f"step-{self.step}")
                if self.stop_reason:
                    mon.write(f"posttrain: stopping at step {self.step}: {self.stop_reason}")
                    break
            if self.best is not None and self.t.early_stopping_patience and not self.guard_fired:
                self._restore_best()
        finally:
            mon.close()
        return {"steps": self.step, "train_time_s": time.time() - t_start, "best_eval_loss": self.best,
                "stop_reason": self.stop_reason, "tokens_seen": self.tokens_seen}

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        stats = self.compute_gradients(micro)
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):
            self._fail_non_finite(grad_norm, None, what="gradient norm")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = stats.pop("tokens")
        self.tokens_seen += tokens
        out = {"loss": stats.pop("loss"), "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens * world_size() / dt, "step_time_s": dt,
               "epoch": self.sampler.pos.epoch + self.sampler.pos.batch / self.sampler.batches_per_epoch}
        out.update(stats)
        return out

    def _run_checks(self, metrics: dict) -> None:
        """The step checks, in order, until one stops the run: their metrics are logged at this step."""
        for c in self.checks:
            if self.stop_reason:
                return
            out, reason = c.after_step(self.model, self.step, self.total_steps, metrics)
            if out:
                if c.split == "train":  # logged with the step's own training metrics
                    metrics.update(out)
                else:
                    self.monitor.log(self.step, c.split, out)
                    self.history.append({"step": self.step, **out})
            if reason:
                self.stop_reason, self.guard_fired = reason, True

    def _next_micro_batches(self) -> list[dict]:
        """The micro-batches of the next optimizer step.

        A `RolloutStage` turns each batch of `train.batch_size` prompts into a rollout that yields
        several optimizer steps (PPO epochs x minibatches), each a list of micro-batches. Other
        stages collate data directly.
        """
        if not isinstance(self.stage, RolloutStage):
            return [self.data.collate([self.data.train[i] for i in self.sampler.next_batch()])
                    for _ in range(self.t.grad_accum)]
        if not self._pending:
            prompts = self.data.collate([self.data.train[i] for i in self.sampler.next_batch()])
            # each rank samples its own prompts; rollout_view keeps that free of per-forward collectives
            with rollout_view(self.model) as sampler_model:
                self._pending = list(self.stage.rollout(sampler_model, prompts))
            if not self._pending:
                raise TrainingError(f"step {self.step + 1}: stage {self.stage.name} returned no optimizer steps")
        return self._pending.pop(0)

    def compute_gradients(self, micro: list[dict]) -> dict:
        """Accumulate the gradient of one optimizer step over `micro` batches (token-level normalized).

        Returns the step's mean loss, its real token count and the stage's metrics averaged over
        micro-batches. Gradients are left in `.grad` for the optimizer.
        """
        units = sum(int(self.stage.num_loss_units(b)) for b in micro)
        total_units = int(all_reduce_sum(torch.tensor(units, dtype=torch.long)).item())
        if total_units == 0:
            raise TrainingError(f"step {self.step + 1}: no loss tokens in the batch (check masking/truncation)")
        loss_total = 0.0
        tokens = 0
        extra: dict[str, float] = {}
        for j, batch in enumerate(micro):
            batch = move_to(batch, self.device)
            with self._autocast():
                loss_sum, m = self.stage.loss(self.model, batch)
            value = float(loss_sum.detach())
            if not math.isfinite(value):
                self._fail_non_finite(value, j)
            # DDP and FSDP average gradients over ranks; scaling by the world size turns that
            # average back into the sum over all ranks' units, divided by their global count
            (loss_sum * world_size() / total_units).backward()
            loss_total += value
            tokens += int(batch.get("num_real_tokens", batch["input_ids"].numel()))
            for k, v in m.items():
                extra[k] = extra.get(k, 0.0) + float(v)
        loss = float(all_reduce_sum(torch.tensor(loss_total)).item()) / total_units
        return {"loss": loss, "tokens": tokens, **{k: v / len(micro) for k, v in extra.items()}}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.t.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))

    def _fail_non_finite(self, value: float, micro: Optional[int], what: str = "loss") -> None:
        last = ckpt.latest_checkpoint(self.ckpt_root)
        where = f" (micro-batch {micro + 1} of {self.t.grad_accum})" if micro is not None else ""
        keep = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written before it"
        raise TrainingError(
            f"non-finite {what} ({value}) at step {self.step + 1}{where}; the run was stopped and {keep}. "
            "Try a lower train.lr, train.precision=fp32, or check the data for empty/odd rows."
        )

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_loss(self) -> Optional[float]:
        if not self.data.eval:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        total, units = 0.0, 0
        bs = self.t.batch_size
        items = self.data.eval
        # every rank runs the same number of forward passes (under FSDP2 each one is a collective):
        # a rank whose share ran out scores a stand-in batch and leaves it out of the sums
        for r in range(math.ceil(len(items) / (bs * world_size()))):
            i = (r * world_size() + rank()) * bs
            batch = move_to(self.data.collate(list(items[i:i + bs] if i < len(items) else items[:1])), self.device)
            with self._autocast():
                loss_sum, _ = self.stage.loss(model, batch)
            if i < len(items):
                total += float(loss_sum)
                units += int(self.stage.num_loss_units(batch))
        total = float(all_reduce_sum(torch.tensor(total)).item())
        units = int(all_reduce_sum(torch.tensor(units)).item())
        if was_training:
            model.train()
        return total / max(units, 1)

    def _evaluate_and_maybe_stop(self) -> None:
        metrics: dict[str, Any] = {}
        loss = self.eval_loss()
        if loss is not None:
            metrics["loss"] = loss
        for fn in self.evaluators:
            was = self.model.training
            self.model.eval()
            metrics.update(fn(self.model, self.step))
            if was:
                self.model.train()
        if not metrics:
            return
        self.monitor.log(self.step, "eval", metrics)
        self.history.append({"step": self.step, **metrics})
        if self.guard is not None:
            reason = self.guard(metrics)
            if reason:
                # the guard has restored the weights it trusts; the loss-based best must not override it
                self.stop_reason = reason
                self.guard_fired = True
                return
        score = metrics.get("loss")
        if score is not None:
            if self.best is None or score < self.best - self.t.early_stopping_min_delta:
                self.best = score
                self.bad_evals = 0
                self._save("best", keep=False)
            else:
                self.bad_evals += 1
                pat = self.t.early_stopping_patience
                if pat and self.bad_evals >= pat:
                    self.stop_reason = (f"early stopping: held-out loss has not improved on {self.best:.4f} "
                                        f"for {pat} evaluations")

    def _save(self, name: str, keep: bool = True) -> None:
        rl = {"stage": self.stage.state_dict(), "pending": self._pending} \
            if keep and isinstance(self.stage, RolloutStage) else None
        ckpt.save_checkpoint(self.ckpt_root, name, model=self.model,
                             optimizer=self.optimizer if keep else None,
                             scheduler=self.scheduler if keep else None,
                             trainer_state=self._state(), keep_last=self.t.keep_last if keep else None,
                             stage_state=rl)

    def _restore_best(self) -> None:
        best_dir = self.ckpt_root / "best"
        if best_dir.exists():
            ckpt.load_weights(best_dir, self.model)
            self.monitor.write(f"posttrain: restored the best weights (held-out loss {self.best:.4f})")
