"""What PPO, GRPO and distill share around their rollouts: sampling with a fresh seed per rollout, the
reference's and the bf16 old log-probs, the split into optimizer steps, and the counters that a
checkpoint must carry for a resumed run to draw the same rollouts (`state_dict`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from posttrain.engine.precision import autocast
from posttrain.engine.reference import Reference
from posttrain.engine.setup import rl_reference
from posttrain.rollout.batches import micro_batches, minibatch_indices
from posttrain.rollout.engine import Rollout, RolloutEngine
from posttrain.rollout.episodes import Environment, Episodes, run_episodes
from posttrain.rollout.logprobs import completion_logprobs
from posttrain.rollout.sampling import SamplingParams

# rows to run and the loss units of the rows left out (GRPO's zero-advantage rows), per minibatch
RowFilter = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, int]"]


def zero_advantage_filter(units: Callable[[torch.Tensor], int]) -> RowFilter:
    """A `RowFilter` that leaves the rows of advantage exactly 0 out of a minibatch's passes and counts
    their `units(completion_mask)`: without a KL term such a row has loss and gradient 0 (ratio x 0), and
    it still counts in the normalization, so the step's gradient is unchanged. At least one row is kept."""
    def keep(part: torch.Tensor, t: dict) -> tuple[torch.Tensor, int]:
        zero = t["advantages"][part] == 0
        zero[0] = zero[0] and not bool(zero.all())
        return part[~zero], units(t["completion_mask"][part[zero]])
    return keep


class RolloutSession:
    """Sampling state of one RL run.

    Args:
        params: the sampling settings (`seed` is set per rollout: seed * 100003 + rollout index).
        reference: builds the frozen reference the first time it is needed (`logprobs(..., reference=True)`).
    """

    def __init__(self, tokenizer, params: SamplingParams, *, seed: int, precision: str, backend: str = "hf",
                 batch_size: int = 64, reference: Optional[Callable[[torch.nn.Module], Reference]] = None,
                 merge_adapter: bool = False):
        self.tokenizer, self.params, self.seed, self.precision = tokenizer, params, seed, precision
        self.backend, self.batch_size, self.merge_adapter = backend, batch_size, merge_adapter
        self.make_reference = reference
        self.reference: Optional[Reference] = None
        self.gen = torch.Generator().manual_seed(seed)  # minibatch shuffles
        self.rollouts = 0
        self._engine: Optional[RolloutEngine] = None
        self._last_end: Optional[float] = None
        self.metrics: dict = {}
        self.last: Optional[Rollout] = None  # the latest rollout, for inspection

    @classmethod
    def for_run(cls, tokenizer, s, cfg, *, n: int = 1) -> "RolloutSession":
        """The session of an RL run: sampling settings from its section `s` (SamplingSection), `n`
        samples per prompt, the run's seed and precision, and `engine.setup.rl_reference` for the reference."""
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, stop=tuple(s.stop), n=n)
        return cls(tokenizer, params, seed=cfg.train.seed, precision=cfg.train.precision, backend=s.backend,
                   batch_size=s.rollout_batch_size, reference=rl_reference(cfg), merge_adapter=s.merge_adapter)

    def sample(self, model, rows: list[dict]) -> Rollout:
        """Sample the rows' rendered prompts (`_prompt`); `self.metrics` gets this rollout's generation
        time and speed, and the time the previous rollout's optimizer steps took."""
        t0 = self._next_rollout(model)
        ro = self.last = self._engine.generate([r["_prompt"] for r in rows], self.params)
        self._timed(t0, ro.tokens_per_s)
        return ro

    def play(self, model, rows: list[dict], make_env: Callable[[], Environment], *, group_size: int,
             max_turns: int, max_length: Optional[int] = None) -> Episodes:
        """The multi-turn counterpart of `sample`: `group_size` episodes per row against environments
        from `make_env` (`rollout.episodes.run_episodes`), seeded like `sample`."""
        t0 = self._next_rollout(model)
        params = dataclasses.replace(self.params, n=1)
        eps = run_episodes(self._engine, rows, make_env, params, group_size=group_size, max_turns=max_turns,
                           max_length=max_length)
        self._timed(t0, float(eps.loss_mask.sum()) / max(eps.time_s, 1e-9))
        return eps

    def _next_rollout(self, model) -> float:
        t0 = time.perf_counter()
        if self._engine is None or self._engine.model is not model:
            options = {"merge_adapter": True} if self.merge_adapter else {}  # an hf backend option
            self._engine = RolloutEngine(model, self.tokenizer, backend=self.backend, batch_size=self.batch_size,
                                         **options)
        self.params.seed = self.seed * 100_003 + self.rollouts
        self.rollouts += 1
        return t0

    def _timed(self, t0: float, tokens_per_s: float) -> None:
        self.metrics = {"rollout_time_s": time.perf_counter() - t0, "rollout_tokens_per_s": tokens_per_s}
        if self._last_end is not None:
            self.metrics["update_time_s"] = t0 - self._last_end

    @torch.no_grad()
    def logprobs(self, model, t: dict, *, reference: bool, temperature: float, old: bool = True) -> dict:
        """`logprobs`: old log-probs recomputed under bf16 autocast (so the first ratio is exactly 1 in
        the training precision; in fp32 the sampling-time log-probs match a training pass within the
        bound tested in tests/rollout and are kept); `old=False` skips that pass (a stage that updates
        once per rollout uses its own detached log-probs); `ref_logps` under the reference when asked."""
        out = {}
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}
        was = model.training
        model.eval()
        try:
            with autocast(self.precision, device):
                if self.precision == "bf16" and old:
                    out["logprobs"] = completion_logprobs(model, b, temperature=temperature).float().cpu()
                if reference:
                    if self.reference is None:
                        self.reference = self.make_reference(model)
                    with self.reference.context(model) as ref:
                        out["ref_logps"] = completion_logprobs(ref, b, temperature=temperature).float().cpu()
        finally:
            model.train(was)
        return out

    @torch.no_grad()
    def evaluate(self, model, fn: Callable[[torch.nn.Module, dict], torch.Tensor], t: dict) -> torch.Tensor:
        """`fn(model, batch)` on the rollout's tensors in eval mode under the run's precision (PPO's values)."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            with autocast(self.precision, device):
                return fn(model, {k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}).float().cpu()
        finally:
            model.train(was)

    def steps(self, t: dict, n_rows: int, *, passes: int, minibatches: int, micro_batch_size: int, extra: dict,
              keep: Optional[RowFilter] = None) -> list[list[dict]]:
        """The rollout's optimizer steps: `passes` x `minibatches` random minibatches, each cut into
        micro-batches; `keep` may leave rows out of a minibatch's passes (their units still count)."""
        out = []
        for _ in range(passes):
            for part in minibatch_indices(n_rows, minibatches, self.gen):
                rows, skipped = keep(part, t) if keep is not None else (part, 0)
                micro = micro_batches(t, rows, micro_batch_size, extra=extra)
                micro[0]["skipped_units"] = skipped
                out.append(micro)
        self._last_end = time.perf_counter()
        return out

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state["rollouts"])
        self.gen.set_state(state["gen"])
