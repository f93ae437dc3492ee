"""The default-on drift guard: drift from the base and general-text perplexity, checked on a time
budget while a run trains, with stop and roll-back past a limit (`eval.guard`, docs/eval.md).

    guard = DriftGuard(model, tokenizer)              # the model about to be trained
    Engine(model, stage, data, cfg, checks=[guard]).fit()

`stages.common.run_training` builds it for every stage through `eval.guard.default_guard`.

`DriftGuard` measures drift from the starting model (KL per token on its own continuations of
the bundled general prompts) and the general-text perplexity change (`eval/drift.py`), on a
budget: a check runs as soon as the time spent on the guard, this check included, stays within
`budget` (10%) of the wall time so far, so the interval follows the measured cost of a check and
the measured step time, and a stage with slow steps (RL) checks more often in steps, up to
`max_checks` (20) a run. The base's reference is built in pieces, each paid by the check that first
uses it: the first check measures an eighth of the prompts and text, each later one more (8, 16,
32, 48, 64 prompts), so the first check is cheap and early, and a cold cache costs nothing before
training. A run too short to afford a check within the budget is not checked (its summary says so).
Past a limit it restores the trainable weights of the last check within the limits (the starting
weights if none) and stops the run with a one-line reason. The engine runs it as a `StepCheck`
(`after_step`) after every optimizer step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import DynamicCache

from posttrain.config import EvalConfig
from posttrain.engine.dist import all_reduce_sum, rank, world_size
from posttrain.eval import drift as drift_mod
from posttrain.eval import perplexity
from posttrain.models import adapters

_MARGIN = 1.2  # next_cost's allowance for the estimate's error

# Default limits, chosen from the gym calibration (docs/eval.md, "Calibration"): see the reasons there.
# One source: the config's defaults (config.EvalConfig).
_E = EvalConfig.model_fields
DEFAULT_MAX_DRIFT_KL = _E["guard_max_drift_kl"].default
DEFAULT_MAX_PPL_CHANGE = _E["guard_max_ppl_change"].default
DEFAULT_BUDGET = _E["guard_budget"].default
DEFAULT_PROMPTS = _E["guard_prompts"].default


def within_budget(spent_s: float, check_s: float, train_s: float, budget: float) -> bool:
    """Whether one more check of `check_s` seconds keeps all checks within `budget` of the wall time:
    (spent + check) <= budget * (train + spent + check). With steps of `t` seconds this runs a check
    every ceil(check_s * (1 - budget) / (budget * t)) steps or so: 9 steps of 1 s for a 1-s check at 10%."""
    return spent_s + check_s <= budget * (train_s + spent_s + check_s)


def _restore(model, state: dict) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


@dataclass
class _Piece:
    """One slice of the guard's reference: drift prompts and general-text rows, each a stride through the
    whole set (so every slice spreads over every kind and form), and, once active, the base's reference
    on them and the starting model's numbers."""

    prompts: list
    text_rows: list
    text_start: list
    cached: bool = False  # the base's reference on it was in the cache when the guard was built
    ref: Optional[drift_mod.DriftReference] = None
    base_nll: tuple = (0.0, 0)  # (summed NLL, tokens) of the base on text_rows
    start_kl: list = field(default_factory=list)  # (KL sum, tokens) per prompt, of the starting model
    start_nll: tuple = (0.0, 0)


class DriftGuard:
    """Drift and general-text perplexity checks on a time budget, with stop and roll-back past a limit.

    The engine calls `after_step` after every optimizer step (an `engine.trainer.StepCheck`): when
    `due(step, total_steps)`, it measures (`guard(model, step)`, model in eval mode) and returns the
    metrics and `check(metrics)`, None or the one-line stop reason (the weights are rolled back then).

    The reference grows with the run: its prompts and text rows are split into pieces (`_split`: 8,
    8, 16, 16 and 16 of each by default, `piece_size` 8), and the first check uses the first piece,
    each later check one piece more (8, 16, 32, 48, then 64 prompts at every check). A piece is
    built (the base's greedy continuations and top-k distributions, its general-text NLL; or read
    from the cache) when the check that first uses it runs, and that check pays for it from the
    budget. So nothing but a timed probe (`_probe`) and a CPU copy of the starting weights happens
    before training, and the first check costs about an eighth of a full one: it comes early, and a
    run stopped later rolls back to recent weights rather than to the start.

    max_drift_kl: limit on `drift_kl` (nats per token, KL(start ‖ now)); None: only logged.
    max_ppl_change: limit on `general_ppl_change` (relative, 0.25 = 25% higher perplexity); None: only logged.
    budget: the share of the wall time the guard may take (0.10), everything included: the probe, the
        pieces of the reference it builds, the checks. A check runs only when its estimated cost (the
        pieces it adds and the forwards on all active pieces; measured, after the first) fits.
    rollback: keep (on the CPU) the trainable weights of the last check within the limits and restore
        them when a limit is crossed; with False the run only stops.
    max_checks: at most this many checks per run (one every total_steps / max_checks steps, and the last
        step's): a run with slow steps (RL) would otherwise spend its whole budget on checks that
        tell nothing new (a 160-step GRPO run made 109 checks, 9.2% of its time; with 20, about 2%).
    """

    def __init__(self, model, tokenizer, *, text_source=None, max_drift_kl: Optional[float] = DEFAULT_MAX_DRIFT_KL,
                 max_ppl_change: Optional[float] = DEFAULT_MAX_PPL_CHANGE, budget: float = DEFAULT_BUDGET,
                 n_prompts: Optional[int] = DEFAULT_PROMPTS, max_new_tokens: int = 32, n_text: int = 64,
                 batch_size: int = 16, rollback: bool = True, max_checks: int = 20, piece_size: int = 8,
                 top_k: int = 64, clock: Callable[[], float] = time.perf_counter):
        for name, v in (("max_drift_kl", max_drift_kl), ("max_ppl_change", max_ppl_change)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or None to only log), got {v}")
        if not 0 < budget < 1:
            raise ValueError(f"budget must be in (0, 1) (a share of the training time), got {budget}")
        if piece_size < 1:
            raise ValueError(f"piece_size must be >= 1, got {piece_size}")
        self.max_drift_kl, self.max_ppl_change, self.budget = max_drift_kl, max_ppl_change, budget
        self.rollback, self.batch_size, self.clock, self.max_checks = rollback, batch_size, clock, max_checks
        self.max_new_tokens, self.top_k = max_new_tokens, top_k
        t0 = clock()
        # snapshots, builds and roll-back go through the model given here: a DDP wrapper the engine calls
        # the guard with shares its parameters but prefixes their names with "module."
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = drift_mod._pad_id(tokenizer)
        self.adapted = adapters.is_adapted(model)
        self.base_fp = drift_mod.fingerprint(model, tokenizer)  # the base's hash, once: its weights move later
        has_template = bool(getattr(tokenizer, "chat_template", None))
        prompts = [r for r in drift_mod.subset(drift_mod.load_prompts(), n_prompts)
                   if has_template or r.get("form") != "chat"]
        if not prompts:
            raise ValueError("no drift prompts could be encoded (only chat rows and no chat template)")
        rows, start, self.text_source = perplexity.general_text_rows(tokenizer, text_source, n=n_text)
        self.pieces = _split(prompts, rows, start, piece_size)
        for p in self.pieces:
            p.cached = (not p.prompts or drift_mod.is_cached(self.base_fp, p.prompts, max_new_tokens, top_k)) and \
                (not p.text_rows or perplexity.cached_base_nll(self.base_fp, p.text_rows, p.text_start,
                                                               batch_size=batch_size, pad_id=self.pad_id) is not None)
        self.n_active = self._resume_pieces = 0
        self.start_is_base, rate, self._decode_s, self._probe_len = self._probe()
        # seconds per token: of a check's forwards, and of making a piece active (cached or not, per
        # its own tokens); the probe's rate until each is measured
        self._rate = {"check": rate, True: None, False: None}
        # the starting weights: the roll-back target until a check passes, and what a piece is built
        # from (a full fine-tune's base) or measured with (a starting adapter that is not the identity)
        # after training has moved the weights; dropped once every piece is active
        needed = (self.adapted and not self.start_is_base) or \
            (not self.adapted and not all(p.cached for p in self.pieces))
        self.start_weights = self._snapshot() if (rollback or needed) else None
        self.good = self.start_weights if rollback else None
        self.good_step = 0
        if not needed:
            self.start_weights = None
        self.history: list[dict] = []
        self.check_s = self.build_s = 0.0
        if world_size() > 1:  # under several processes the whole reference is built now, before wrapping
            self._grow(len(self.pieces), swap=False)
        self.setup_s = clock() - t0
        self.spent_s = self.setup_s
        self.train_s = 0.0
        self._next_cost: Optional[float] = None  # next_cost(), until the next check changes it
        self._last = clock()

    # ------------------------------------------------------------ the pieces

    @torch.inference_mode()
    def _probe(self) -> tuple[bool, float, Optional[float], float]:
        """Timed forwards of the first piece's prompts, the only measurement before training: the time
        per token of a forward and of one decoding step (with the KV cache) price the first check and
        the generation of its piece (later ones are priced by what the earlier ones cost). The
        starting model is its base when their logits here are bit-identical (a full fine-tune, a fresh
        LoRA): the start's drift is then 0 on every prompt without measuring it."""
        seqs = drift_mod.encode_prompts(self.tokenizer, self.pieces[0].prompts) or [[self.pad_id]]
        ids, mask = _padded(seqs, self.pad_id)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        was = self.model.training
        self.model.eval()
        try:
            self.model(input_ids=ids[:, :1], use_cache=False)  # a first call can pay one-time set-up (kernels)
            cache = DynamicCache(config=self.model.config)
            t0 = self.clock()
            out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            rate = (self.clock() - t0) / max(int(mask.sum()), 1)
            decode_s = None
            try:
                nxt = torch.cat([mask, mask[:, :1]], dim=1)
                t0 = self.clock()
                self.model(input_ids=ids[:, -1:], attention_mask=nxt, cache=cache, use_cache=True)
                decode_s = self.clock() - t0
            except (TypeError, ValueError, RuntimeError, AttributeError):  # no KV cache here (a prefix adapter)
                pass
            same = True
            if self.adapted:
                with adapters.disabled(self.model):
                    base = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                same = out.logits.shape == base.shape and torch.equal(out.logits, base)
        finally:
            self.model.train(was)
        return same, rate, decode_s, sum(len(x) for x in seqs) / len(seqs)

    def _tokens(self, p: _Piece) -> int:
        """A piece's size for pricing: its prompts with their continuations, and its text rows."""
        if p.ref is not None:
            prompt = sum(len(x) for x in p.ref.sequences)
        else:
            prompt = len(p.prompts) * (self._prompt_len() + self.max_new_tokens)
        return max(1, prompt + sum(len(r) for r in p.text_rows))

    def _prompt_len(self) -> float:
        built = [x for p in self.pieces if p.ref is not None for x in p.ref.sequences]
        return sum(len(x) for x in built) / len(built) - self.max_new_tokens if built else self._probe_len

    def _est_check(self, n: int) -> float:
        """The estimated time of a check on the first n pieces."""
        return self._rate["check"] * sum(self._tokens(p) for p in self.pieces[:n])

    def _est_build(self, p: _Piece) -> float:
        """The estimated time to make a piece active, at the measured rate of the last piece of its kind
        (cached or not); before one was measured, for an uncached piece the generation of its
        continuations (one decoding step per new token, each as long as the probe's) and the base's
        forwards on it; plus the start's forwards when the start is not the base."""
        if self._rate[p.cached] is not None:
            return self._rate[p.cached] * self._tokens(p)
        one = self._rate["check"] * self._tokens(p)
        if p.cached:
            gen = 0.0
        elif self._decode_s is not None:
            gen = self._decode_s * self.max_new_tokens * max(1.0, len(p.prompts) / len(self.pieces[0].prompts))
        else:
            gen = one * self.max_new_tokens
        return gen + (0.0 if p.cached else one) + (0.0 if self.start_is_base else one)

    def _grow(self, n: int, *, swap: bool = True) -> None:
        """Make the first n pieces active: each one's base reference from the cache or built, and the
        starting model's numbers on it. A full fine-tune's base is its starting weights, so they are put
        back for a build and the current weights restored after it (likewise the starting adapter when
        it is not the identity)."""
        new = self.pieces[self.n_active:n]
        if not new:
            return
        start = swap and self.start_weights is not None and \
            (not self.start_is_base or any(not p.cached for p in new))
        current = self._snapshot() if start else None
        try:
            if start:
                _restore(self.model, self.start_weights)
            for p in new:
                t0 = self.clock()
                self._activate(p)
                took = self.clock() - t0
                self.build_s += took
                self._rate[p.cached] = took / self._tokens(p)
                p.cached = True
        finally:
            if current is not None:
                _restore(self.model, current)
        self.n_active = n
        if self.n_active == len(self.pieces):
            self.start_weights = None  # the roll-back target, if still the start, is self.good

    def _activate(self, p: _Piece) -> None:
        if p.prompts:
            p.ref = drift_mod.build_drift_reference(self.model, self.tokenizer, prompts=p.prompts,
                                                    max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                                                    batch_size=self.batch_size, base_fingerprint=self.base_fp)
        if p.text_rows:
            p.base_nll = perplexity.base_nll(self.model, p.text_rows, p.text_start, base_fingerprint=self.base_fp,
                                             batch_size=self.batch_size, pad_id=self.pad_id)
        if self.start_is_base:
            p.start_kl, p.start_nll = [(0.0, c) for c in (p.ref.n_cont if p.ref else [])], p.base_nll
        else:
            p.start_kl, p.start_nll = self._piece_numbers(self.model, p)

    def _piece_numbers(self, model, p: _Piece) -> tuple[list, tuple]:
        """(KL sum, tokens) per prompt and (NLL sum, tokens) of the text: `model` on one piece, batched as
        the piece's reference was (so the base measured against itself gives exactly 0)."""
        kl = drift_mod.prompt_kl(model, p.ref, batch_size=self.batch_size, pad_id=self.pad_id) \
            if p.ref is not None and p.ref.sequences else []
        nll = perplexity.nll_sums(model, p.text_rows, p.text_start, batch_size=self.batch_size, pad_id=self.pad_id) \
            if p.text_rows else (0.0, 0)
        return kl, nll

    def _numbers(self, per_piece: list) -> dict:
        """A check's metrics from `_piece_numbers` of the active pieces: the drift over all their prompts
        (`drift_prompts` of them), the drift on the first piece alone (`drift_kl_core`: the same prompts
        at every check, the series to compare across checks), and the perplexity change on their text."""
        active = self.pieces[:len(per_piece)]
        kl = [x for k, _ in per_piece for x in k]
        d = drift_mod.summarize_kl(kl) if kl else {"drift_kl": 0.0, "drift_kl_stderr": 0.0, "drift_prompts": 0}
        core = drift_mod.summarize_kl(per_piece[0][0])["drift_kl"] if per_piece[0][0] else 0.0
        nll, count = sum(n[0] for _, n in per_piece), sum(n[1] for _, n in per_piece)
        base, base_count = sum(p.base_nll[0] for p in active), sum(p.base_nll[1] for p in active)
        ppl, ppl_base = math.exp(nll / max(count, 1)), math.exp(base / max(base_count, 1))
        return {"drift_kl": d["drift_kl"], "drift_kl_stderr": d["drift_kl_stderr"], "drift_prompts": d["drift_prompts"],
                "drift_kl_core": core, "general_ppl": ppl, "general_ppl_base": ppl_base,
                "general_ppl_change": ppl / ppl_base - 1.0}

    @property
    def start(self) -> dict:
        """The starting model's numbers on the active pieces (the limits apply to the change since
        then); before any piece is active, 0 when the start is the base, else None (not measured)."""
        if not self.n_active:
            v = 0.0 if self.start_is_base else None
            return {"drift_kl": v, "general_ppl_change": v}
        return self._numbers([(p.start_kl, p.start_nll) for p in self.pieces[:self.n_active]])

    def _measure(self, model) -> dict:
        was = model.training
        model.eval()
        try:
            return self._numbers([self._piece_numbers(model, p) for p in self.pieces[:self.n_active]])
        finally:
            model.train(was)

    # ------------------------------------------------------------ the cadence

    name = "guard"  # the run's result["guard"] is its summary()
    split = "eval"  # its metrics are logged with the run's evaluations (the report plots them)

    def _next_size(self) -> int:
        """The pieces the next check measures: one more than the last check's, after a resume at least
        as many as before it, at most all."""
        return min(len(self.pieces), max(self.n_active + 1, self._resume_pieces))

    def next_cost(self) -> float:
        """The estimated time of the next check, the pieces it adds included, with a margin of
        `_MARGIN` for the estimate's error: on a loaded machine a check took up to 13% more than its
        estimate (2.59 s for 2.30 s), and a check at the last step has no training after it to make
        up for it (a tiny run ended at 10.02% without the margin)."""
        n = self._next_size()
        return _MARGIN * (sum(self._est_build(p) for p in self.pieces[self.n_active:n]) + self._est_check(n))

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a check runs after `step`: the time since the last call counts as training time,
        and a check is due when the guard's total would stay within `budget` of all the time spent.
        Under several processes rank 0's clock decides for all (a check is a collective under FSDP)."""
        now = self.clock()
        self.train_s += now - self._last
        last = self.history[-1]["step"] if self.history else 0
        spaced = not total_steps or step >= total_steps or step - last >= total_steps / self.max_checks
        if self._next_cost is None:
            self._next_cost = self.next_cost()
        d = spaced and within_budget(self.spent_s, self._next_cost, self.train_s, self.budget)
        d = bool(all_reduce_sum(torch.tensor(int(d) if rank() == 0 else 0)).item())
        self._last = self.clock()
        self.spent_s += self._last - now  # this decision, at every step, is the guard's time too
        return d

    def after_step(self, model, step: int, total_steps: int, metrics: dict) -> tuple[dict, Optional[str]]:
        """The engine's hook: ({}, None) between checks; (the check's metrics, stop reason or None) at one."""
        if not self.due(step, total_steps):
            return {}, None
        m = self(model, step)
        return m, self.check(m)

    def state_dict(self) -> dict:
        """The time accounting, the checks so far and how many pieces they used. The last good weights
        are not checkpointed (a copy of the weights); after a resume the roll-back target is the
        starting weights until a check passes again."""
        return {"spent_s": self.spent_s, "train_s": self.train_s, "history": self.history, "pieces": self.n_active}

    def load_state_dict(self, state: dict) -> None:
        # this process's own set-up (the probe) is already in spent_s; its next check measures as many
        # pieces as the last one before the checkpoint, so the checks stay comparable
        self.spent_s += float(state.get("spent_s", 0.0))
        self.train_s += float(state.get("train_s", 0.0))
        self.history = list(state.get("history", [])) + self.history
        self._resume_pieces = int(state.get("pieces", 0))
        self._next_cost = None

    def __call__(self, model, step: int) -> dict:
        t0 = self.clock()
        self._grow(self._next_size())
        t1 = self.clock()
        m = self._measure(model)
        t2 = self.clock()
        self.check_s = t2 - t1
        self._rate["check"] = self.check_s / sum(self._tokens(p) for p in self.pieces[:self.n_active])
        self._next_cost = None
        self.spent_s += t2 - t0
        self._last = t2  # the check's own time is not training time
        m["guard_time_share"] = self.spent_s / max(self.train_s + self.spent_s, 1e-9)
        if self._reason(m) is None:
            self.good_step = step
            if self.rollback:
                self.good = self._snapshot()
        self.history.append({"step": step, **m})
        return m

    def _snapshot(self) -> dict:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def _reason(self, m: dict) -> Optional[str]:
        # limits apply to the change since the start, on the same pieces: a run that continues an
        # adapter starts with some drift from the base already, and only what this run adds is held against it
        over = []
        start = self.start
        kl = m.get("drift_kl", 0.0) - (start["drift_kl"] or 0.0)
        ppl = m.get("general_ppl_change", 0.0) - (start["general_ppl_change"] or 0.0)
        if self.max_drift_kl is not None and kl > self.max_drift_kl:
            over.append(f"drift from the base {m['drift_kl']:.3f} nats/token > limit {self.max_drift_kl}")
        if self.max_ppl_change is not None and ppl > self.max_ppl_change:
            over.append(f"general-text perplexity {m['general_ppl_change']:+.1%} vs the base > limit "
                        f"+{self.max_ppl_change:.0%}")
        return "; ".join(over) or None

    def check(self, metrics: dict) -> Optional[str]:
        """The stop reason when a limit is crossed (after rolling back), else None."""
        over = self._reason(metrics)
        if over is None:
            return None
        reason = f"forgetting guard: {over}"
        if self.rollback and self.good is not None:
            _restore(self.model, self.good)
            reason += f"; weights rolled back to step {self.good_step}"
        return reason + " (eval.guard: off disables it)"

    def summary(self) -> dict:
        """For the run's result: limits, checks, time share, and the last check's numbers (the start's
        when the run was too short for a check within the budget; `note` says so)."""
        last = self.history[-1] if self.history else self.start
        out = {"max_drift_kl": self.max_drift_kl, "max_ppl_change": self.max_ppl_change, "checks": len(self.history),
               "first_check_step": self.history[0]["step"] if self.history else None,
               "last_check_step": last.get("step", 0), "good_step": self.good_step,
               "check_s": round(self.check_s, 3), "setup_s": round(self.setup_s, 3), "build_s": round(self.build_s, 3),
               "spent_s": round(self.spent_s, 3), "train_s": round(self.train_s, 3),
               "time_share": round(self.spent_s / max(self.train_s + self.spent_s, 1e-9), 4),
               "drift_kl": last["drift_kl"], "drift_prompts": last.get("drift_prompts", 0),
               "general_ppl_change": last["general_ppl_change"], "text_source": self.text_source}
        if not self.history:
            out["note"] = (f"no check after the start: the run ({self.train_s:.1f} s of training) was too short for a "
                           f"check of {self.next_cost():.2f} s within {self.budget:.0%} of its time, set-up "
                           f"({self.setup_s:.2f} s) included")
        return out


def _split(prompts: list, rows: list, start: list, piece_size: int) -> list[_Piece]:
    """The guard's pieces: k = ceil(max(#prompts, #rows) / piece_size) strided slices (slice j holds
    items j, j + k, j + 2k, ..., so each spreads over the whole set), grouped 1, 1, 2, 2, 2, ... slices
    a piece: the second piece doubles what the checks measure, the third doubles it again, and each
    later one adds as much (8, 16, 32, 48, 64 prompts). A piece of two slices at most keeps each build
    short and its cost close to the last one measured (generation time is not linear in the batch)."""
    k = max(1, math.ceil(max(len(prompts), len(rows)) / piece_size))
    bounds = [0, 1]
    while bounds[-1] < k:
        bounds.append(min(k, bounds[-1] + min(bounds[-1], 2)))
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        idx = sorted(i for j in range(a, b) for i in range(j, max(len(prompts), len(rows)), k))
        pieces.append(_Piece([prompts[i] for i in idx if i < len(prompts)], [rows[i] for i in idx if i < len(rows)],
                             [start[i] for i in idx if i < len(rows)]))
    return pieces


def _padded(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
    return ids, mask
