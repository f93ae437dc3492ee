"""Reward-hacking detectors for RL (GRPO, PPO): pure functions over per-step metric histories,
and `HackingMonitor`, which runs them as a run goes and warns, logs and (optionally) stops.

Reward hacking is the policy finding what the reward pays for instead of what it was meant to
pay for (Skalse et al. 2022, "Defining and Characterizing Reward Hacking"; Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization"). Each detector watches one symptom:

- `reward_vs_verifier`: the training reward rises (>= 0.1) while a verifier score falls (>= 0.05): a
  reward that checks the task itself (often at weight 0), a multi-turn environment's outcome reward
  without its per-turn shaping, or a held-out score such as the regression score.
- `length_drift`: the mean completion length moves from its start by more than a factor (x2 either
  way), or the share of completions cut off at the length cap rises by >= 0.5.
- `component_divergence`: one reward component rises while another falls, >= 0.1 each (format gaming).
- `diversity_collapse`: distinct bigrams fall below 0.5 x their start, or identical completions within
  a group rise by >= 0.3, or zero-variance groups rise by >= 0.3 while the completions' own diversity falls.
- `kl_bound`: the KL to the reference passes a bound (0.5 nats/token, window mean).

A change is always "the mean of the last `window` values minus the mean of the first `window`"
(start vs now, each averaged to ride over per-step noise), and a detector needs 2·window values
before it can fire. `diversity(completions, group_size, rewards)` turns one rollout into the
per-step diversity metrics.

    mon = HackingMonitor(stop_on=("kl_bound",))
    for step ...:
        metrics = {"reward": ..., "completion_length": ..., "kl": ..., "reward/format": ..., "reward/answer": ...,
                   **diversity(completions, group_size, rewards)}
        reason = mon.update(step, metrics)       # None, or the stop reason
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from statistics import fmean
from typing import Callable, Optional, Sequence

import torch


@dataclass
class Finding:
    """One detector firing: its name, the measured value, the limit it crossed, and a one-line message."""

    detector: str
    value: float
    limit: float
    message: str


def _change(history: Sequence[float], window: int) -> Optional[tuple[float, float]]:
    """(start mean, recent mean) over `window` values each; None until there are 2·window values."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    h = [float(x) for x in history if x is not None and x == x]  # NaN: a component not scored that step
    if len(h) < 2 * window:
        return None
    return fmean(h[:window]), fmean(h[-window:])


def reward_vs_verifier(reward: Sequence[float], verifier: Sequence[float], *, window: int = 5,
                       min_rise: float = 0.1, min_fall: float = 0.05) -> Optional[Finding]:
    """The training reward rose by >= min_rise while the verifier score fell by >= min_fall.

    `verifier` is a score of the task itself on its own cadence (a list as long as the number of times
    it was measured), e.g. a verifier reward at weight 0, an environment's outcome reward, task accuracy
    on held-out prompts or the regression score.
    """
    r, v = _change(reward, window), _change(verifier, window)
    if r is None or v is None:
        return None
    rise, fall = r[1] - r[0], v[0] - v[1]
    if rise >= min_rise and fall >= min_fall:
        return Finding("reward_vs_verifier", fall, min_fall,
                       f"reward rose {r[0]:.3f} -> {r[1]:.3f} while the verifier fell "
                       f"{v[0]:.3f} -> {v[1]:.3f}")
    return None


def length_drift(lengths: Sequence[float], truncated: Sequence[float] = (), *, window: int = 5,
                 max_factor: float = 2.0, min_truncated_rise: float = 0.5) -> Optional[Finding]:
    """The mean completion length grew or shrank by more than `max_factor` from its start, or the share of
    completions cut off at the generation cap (`truncated`) rose by >= `min_truncated_rise` from its start.

    Why the second test: the cap censors the length. A policy that runs to the cap from a start of
    63 tokens under a 112-token cap shows a length ratio of at most 112 / 63 = 1.78, never 2, however
    hard it pushes; the share of completions hitting the cap is the uncensored symptom.
    """
    if max_factor <= 1:
        raise ValueError(f"max_factor must be > 1, got {max_factor}")
    c = _change(lengths, window)
    if c is not None and c[0] > 0:
        factor = c[1] / c[0]
        if factor > max_factor or factor < 1 / max_factor:
            return Finding("length_drift", factor, max_factor,
                           f"mean completion length went {c[0]:.1f} -> {c[1]:.1f} tokens "
                           f"(x{factor:.2f}; limit x{max_factor} either way)")
    t = _change(truncated, window)
    if t is not None and t[1] - t[0] >= min_truncated_rise:
        lengths_moved = f"; mean length {c[0]:.1f} -> {c[1]:.1f} tokens" if c is not None else ""
        return Finding("length_drift", t[1] - t[0], min_truncated_rise,
                       f"completions cut off at the length cap went {t[0]:.0%} -> {t[1]:.0%} "
                       f"(limit +{min_truncated_rise:.0%}{lengths_moved})")
    return None


def component_divergence(components: dict[str, Sequence[float]], *, window: int = 5,
                         min_change: float = 0.1) -> Optional[Finding]:
    """One reward component rose by >= min_change while another fell by >= min_change (format gaming:
    the format reward climbs as the answer reward drops). Reports the largest such pair."""
    changes = {}
    for name, h in components.items():
        c = _change(h, window)
        if c is not None:
            changes[name] = c[1] - c[0]
    if not changes:
        return None
    up = max(changes, key=changes.get)
    down = min(changes, key=changes.get)
    if changes[up] >= min_change and -changes[down] >= min_change:
        return Finding("component_divergence", -changes[down], min_change,
                       f"reward component '{up}' rose {changes[up]:+.3f} while '{down}' fell {changes[down]:+.3f}")
    return None


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the texts' whitespace tokens (Li et al. 2016); 1.0 when none."""
    total, seen = 0, set()
    for t in texts:
        w = t.split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 1.0


def diversity(completions: Sequence[str], group_size: int, rewards: Optional[Sequence[float]] = None) -> dict:
    """Per-rollout diversity: {"distinct_2", "identical_share", "zero_variance_frac"}.

    completions: prompt-major, `group_size` completions per prompt (GRPO's G; PPO: 1).
    identical_share: completions that repeat another of their group, over all completions.
    zero_variance_frac: groups whose rewards are all equal (they carry no GRPO advantage), over groups.
    """
    if group_size < 1 or len(completions) % group_size:
        raise ValueError(f"{len(completions)} completions do not split into groups of {group_size}")
    groups = [completions[i:i + group_size] for i in range(0, len(completions), group_size)]
    repeats = sum(len(g) - len(set(g)) for g in groups)
    out = {"distinct_2": distinct_n(completions, 2), "identical_share": repeats / max(len(completions), 1)}
    if rewards is not None:
        if len(rewards) != len(completions):
            raise ValueError(f"{len(rewards)} rewards for {len(completions)} completions")
        rg = [rewards[i:i + group_size] for i in range(0, len(rewards), group_size)]
        out["zero_variance_frac"] = sum(max(g) - min(g) <= 1e-9 for g in rg) / len(rg) if group_size > 1 else 0.0
    return out


def diversity_collapse(distinct: Sequence[float], identical: Sequence[float] = (), zero_var: Sequence[float] = (), *,
                       window: int = 5, min_distinct_ratio: float = 0.5, min_identical_rise: float = 0.3,
                       min_zero_var_rise: float = 0.3) -> Optional[Finding]:
    """The completions lost their diversity, each measure against the run's own start:

    - distinct bigrams over the rollout fell below `min_distinct_ratio` of their start value;
    - the share of completions identical to another of their group rose by >= `min_identical_rise`;
    - the share of zero-variance groups rose by >= `min_zero_var_rise` *and* the completions' own
      diversity moved at least halfway to one of the two limits above.

    Why relative to the start: a task starts with its own share of duplicates and of groups the
    policy always fails (or always passes); only a change is the policy collapsing. Why zero-variance
    groups need the completions' corroboration: under a 0/1 reward a group of G independent
    completions has zero variance with probability p^G + (1-p)^G, so the share rises whenever
    accuracy moves toward 0 or 1, with every completion still different. That is a run sharpening
    (all right) or degrading (all wrong), and it leaves GRPO without learning signal, but it is not
    collapse; collapse is the completions becoming the same, which the first two measures see.
    Zero-variance groups are a share of 8 groups a step (GRPO's batch in the gym demo): the SD of a
    change between two 5-step window means is <= 0.11, so +0.3 is about 2.7 of those. Identical
    completions are a share of 64 completions (SD of the change <= 0.04): +0.3 is a size (a third more
    of the completions copies of another), far beyond noise.
    """
    c = _change(distinct, window)
    ratio = c[1] / c[0] if c is not None and c[0] > 0 else None
    if ratio is not None and ratio < min_distinct_ratio:
        return Finding("diversity_collapse", ratio, min_distinct_ratio,
                       f"distinct bigrams fell {c[0]:.3f} -> {c[1]:.3f} (below {min_distinct_ratio:.0%} of the start)")
    i = _change(identical, window)
    rise = i[1] - i[0] if i is not None else None
    if rise is not None and rise >= min_identical_rise:
        return Finding("diversity_collapse", rise, min_identical_rise,
                       f"identical completions within a group rose {i[0]:.0%} -> {i[1]:.0%} of the rollout "
                       f"(limit +{min_identical_rise:.0%})")
    z = _change(zero_var, window)
    corroborated = ((ratio is not None and ratio < (1 + min_distinct_ratio) / 2)
                    or (rise is not None and rise >= min_identical_rise / 2))
    if z is not None and z[1] - z[0] >= min_zero_var_rise and corroborated:
        own = [f"distinct bigrams x{ratio:.2f}"] * (ratio is not None) + [f"identical completions {rise:+.0%}"] * (
            rise is not None)
        return Finding("diversity_collapse", z[1] - z[0], min_zero_var_rise,
                       f"zero-variance groups rose {z[0]:.0%} -> {z[1]:.0%} (limit +{min_zero_var_rise:.0%}) while the "
                       f"completions' own diversity fell ({', '.join(own)})")
    return None


def kl_bound(kl: Sequence[float], *, window: int = 5, max_kl: float = 0.5) -> Optional[Finding]:
    """The mean KL to the reference over the last `window` steps passed `max_kl` (nats per token)."""
    h = [float(x) for x in kl if x is not None]
    if len(h) < window:
        return None
    recent = fmean(h[-window:])
    if recent > max_kl:
        return Finding("kl_bound", recent, max_kl,
                       f"KL to the reference {recent:.3f} nats/token (mean of the last {window} steps) "
                       f"> bound {max_kl}")
    return None


DETECTORS = ("reward_vs_verifier", "length_drift", "component_divergence", "diversity_collapse", "kl_bound")


@dataclass
class HackingMonitor:
    """Runs every detector on the run's metric history at each `update`; warns once per detector.

    Metric names read from each step's dict (missing ones are skipped; those detectors stay quiet):
    `reward`, `verifier` (when measured that step), `completion_length`, `truncated_frac`, `kl`, `reward/<component>`
    (two or more for component_divergence), `distinct_2`, `identical_share`, `zero_variance_frac`: the names
    the GRPO stage already logs, plus those of `diversity`.

    stop_on: detectors whose firing stops the run (`update` returns the reason); the others warn.
    model + rollback: keep (on the CPU) the trainable weights of the last step at which no detector
        had fired, every `snapshot_every` steps, and restore them when the run is stopped.
    warn: where warnings go (default: print to stderr).
    """

    window: int = 5
    min_rise: float = 0.1
    min_fall: float = 0.05
    max_length_factor: float = 2.0
    min_truncated_rise: float = 0.5
    min_component_change: float = 0.1
    min_distinct_ratio: float = 0.5
    min_identical_rise: float = 0.3
    min_zero_var_rise: float = 0.3
    max_kl: float = 0.5
    stop_on: tuple[str, ...] = ()
    model: object = None
    rollback: bool = True
    snapshot_every: int = 10
    warn: Optional[Callable[[str], None]] = None
    history: dict = field(default_factory=dict)
    fired: dict = field(default_factory=dict)  # detector -> (step, Finding), the first firing

    def __post_init__(self):
        unknown = [d for d in self.stop_on if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector(s) in stop_on: {unknown}; choose from {list(DETECTORS)}")
        self._good, self._good_step = None, None
        if self.model is not None and self.rollback:
            self._snapshot(0)

    def _snapshot(self, step: int) -> None:
        self._good = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}
        self._good_step = step

    def findings(self) -> list[Finding]:
        """Every detector's finding on the history so far (None-free)."""
        h, w = self.history, self.window
        comps = {k[len("reward/"):]: v for k, v in h.items() if k.startswith("reward/")}
        out = [
            reward_vs_verifier(h.get("reward", []), h.get("verifier", []), window=w, min_rise=self.min_rise,
                               min_fall=self.min_fall),
            length_drift(h.get("completion_length", []), h.get("truncated_frac", []), window=w,
                         max_factor=self.max_length_factor, min_truncated_rise=self.min_truncated_rise),
            component_divergence(comps, window=w, min_change=self.min_component_change) if len(comps) > 1 else None,
            diversity_collapse(h.get("distinct_2", []), h.get("identical_share", []), h.get("zero_variance_frac", []),
                               window=w, min_distinct_ratio=self.min_distinct_ratio,
                               min_identical_rise=self.min_identical_rise, min_zero_var_rise=self.min_zero_var_rise),
            kl_bound(h.get("kl", []), window=w, max_kl=self.max_kl),
        ]
        return [f for f in out if f is not None]

    def update(self, step: int, metrics: dict) -> Optional[str]:
        """Record one step's metrics, run the detectors, warn on new firings; the stop reason or None."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.history.setdefault(k, []).append(float(v))
        found = self.findings()
        stop = []
        for f in found:
            if f.detector not in self.fired:
                self.fired[f.detector] = (step, f)
                (self.warn or _stderr)(f"posttrain: reward hacking? step {step}: {f.message}")
            if f.detector in self.stop_on:
                stop.append(f)
        if not found and self.model is not None and self.rollback and step % self.snapshot_every == 0:
            self._snapshot(step)
        if not stop:
            return None
        reason = "reward-hacking guard: " + "; ".join(f.message for f in stop)
        if self._good is not None:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for n, v in self._good.items():
                    params[n].copy_(v.to(params[n].device))
            reason += f"; weights rolled back to step {self._good_step}"
        return reason

    def metrics(self) -> dict:
        """`hack/<detector>`: 1.0 for each detector that has fired, 0.0 otherwise (to log per step)."""
        return {f"hack/{d}": float(d in self.fired) for d in DETECTORS}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
