"""Standard errors for every reported metric, and for base-vs-tuned differences.

- A rate p over n items (accuracy, refusal rate, ...): the binomial SE sqrt(p(1-p)/n).
- A mean of per-item values that are not 0/1: the sample SE s/sqrt(n) (s with n-1 in the
  denominator), the same formula lm-evaluation-harness uses for means.
- A ratio of sums (perplexity = exp(sum NLL / sum tokens) over documents): a bootstrap over
  documents, 1000 resamples with a fixed seed, so the number is reproducible.
- A difference tuned - base on the same items: the paired SE sd(d_i)/sqrt(n) of the per-item
  differences d_i. Pairing removes the between-item variance both runs share, so a real change
  is seen with fewer items than the unpaired sqrt(se_a^2 + se_b^2), which is used only when the
  items do not line up (different n, or a metric without per-item values).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence


def binomial_se(p: float, n: int) -> float:
    """sqrt(p(1-p)/n); 0 for n == 0."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_se(values: Sequence[float]) -> float:
    """Sample standard error of the mean; binomial when every value is 0 or 1 (the same number up to n/(n-1))."""
    n = len(values)
    if n < 2:
        return 0.0
    if all(v in (0, 1, 0.0, 1.0) for v in values):
        return binomial_se(mean(values), n)
    m = mean(values)
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def bootstrap_se(items: Sequence, statistic: Callable[[Sequence], float], *, resamples: int = 1000,
                 seed: int = 0) -> float:
    """Standard deviation of `statistic` over bootstrap resamples of `items` (fixed seed)."""
    n = len(items)
    if n < 2:
        return 0.0
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        stats.append(statistic([items[rng.randrange(n)] for _ in range(n)]))
    m = mean(stats)
    return math.sqrt(sum((s - m) ** 2 for s in stats) / (resamples - 1))


def metric(values: Sequence[float]) -> dict:
    """{"value", "stderr", "n"} of the mean of per-item values."""
    return {"value": mean(values), "stderr": mean_se(values), "n": len(values)}


def diff_se(a: Optional[Sequence[float]], b: Optional[Sequence[float]], se_a: float, se_b: float) -> tuple[float, bool]:
    """SE of mean(b) - mean(a): paired when both per-item lists line up, else independent.

    Returns (se, paired).
    """
    if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
        d = [y - x for x, y in zip(a, b)]
        m = mean(d)
        var = sum((v - m) ** 2 for v in d) / (len(d) - 1)
        return math.sqrt(var / len(d)), True
    return math.sqrt(se_a ** 2 + se_b ** 2), False
