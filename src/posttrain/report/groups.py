"""Which curves are worth drawing, and under which heading a metric goes.

A run logs dozens of keys. Drawn in one alphabetical grid they hide the three that matter, so
each metric is put in a group by what it means (its name), groups are shown in a fixed order,
and a metric whose every line is a single point or a constant is not drawn at all: its value is
in the last-values table, where a number reads better than a flat line. The studio's run page
uses the same groups and the same rule, so the live page and ``report.html`` look alike.
"""

from __future__ import annotations

import math

# (heading, name fragments), first match wins: "regression_score" is a forgetting check before it
# is a score, "reward_margin" an RL/preference reward before it is a margin.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("rewards and reward-hacking detectors", ("hack/",)),  # hack/length_drift is not a forgetting check
    ("forgetting checks", ("general_ppl",)),  # the guard's general-text perplexity, not a training loss
    ("losses", ("loss", "nll", "perplexity", "ppl")),
    ("forgetting checks", ("regression", "forget", "drift", "divergence", "guard")),
    # eval.hacking's detectors log hack/<detector> flags and distinct_2 / identical_share
    ("rewards and reward-hacking detectors", ("reward", "kl", "entropy", "completion_length", "completion_tokens",
                                              "truncated", "zero_variance", "hack", "distinct", "identical",
                                              "verifier", "advantage", "clip", "explained_variance", "value",
                                              "score_")),
    ("target metric", ("accuracy", "acc", "win_rate", "exact_match", "pass", "score", "correct", "refusal",
                       "call_rate")),
    ("optimization", ("lr", "learning_rate", "grad_norm", "epoch")),
    ("throughput", ("_per_s", "time_s", "elapsed_s", "tokens_seen", "tokens")),
]
OTHER = "other"
# Display order (matching order above differs: a forgetting check is matched before a target metric).
ORDER = ["losses", "target metric", "forgetting checks", "rewards and reward-hacking detectors", "optimization",
         "throughput", OTHER]

# Shown folded (one click away): how training went rather than what it achieved.
FOLDED = {"optimization", "throughput", OTHER}

# The headline metrics come first within their group.
_FIRST = ["loss", "task_accuracy", "regression_score", "lr", "learning_rate"]


def group_of(key: str) -> str:
    k = key.lower()
    if k in ("lr", "learning_rate"):  # "lr" is a fragment of too many words to match anywhere
        return "optimization"
    for name, fragments in GROUPS:
        if any(f in k for f in fragments if f != "lr"):
            return name
    return OTHER


def metric_order(keys) -> list[str]:
    """Grouped by meaning (in `ORDER`), headline metrics first within a group, then alphabetical."""
    def rank(k):
        return ORDER.index(group_of(k)), (_FIRST.index(k) if k in _FIRST else len(_FIRST)), k

    return sorted(set(keys), key=rank)


def worth_plotting(values_per_line: list[list[float]]) -> bool:
    """True when at least one line has two finite points and the finite points are not all equal.

    A single point is not a curve, and a constant (a fixed KL coefficient, a zero penalty) is one
    number drawn 500 pixels wide.
    """
    finite = [[v for v in vs if isinstance(v, (int, float)) and math.isfinite(v)] for vs in values_per_line]
    if max((len(f) for f in finite), default=0) < 2:
        return False
    allv = [v for f in finite for v in f]
    return max(allv) - min(allv) > 1e-12 * max(1.0, abs(max(allv)))


def splits_of(by_split: dict[str, dict], key: str) -> list[str]:
    """The splits whose line of `key` is drawn (``{split: {metric: ...}}``), train first, eval second.

    Wall-clock time is one clock: the train split's line says it, and an eval copy is noise.
    """
    order = sorted(by_split, key=lambda x: (x != "train", x != "eval", x))
    return [sp for sp in order
            if key in by_split[sp] and not (key == "elapsed_s" and sp != "train" and "train" in by_split)]
