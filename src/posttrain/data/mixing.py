"""Blend general-purpose data into domain data, a guard against catastrophic forgetting."""

from __future__ import annotations

import random


def mix_general(train: list, general: list, ratio: float, seed: int = 0) -> tuple[list, dict]:
    """Add general examples so that they make up `ratio` of the returned list (counted in examples).

    n_general = round(ratio / (1 - ratio) * len(train)). When `general` holds fewer examples than
    that, they are drawn with replacement (some repeat), and `info["with_replacement"]` says so.
    The result is shuffled with `seed`, so the same inputs always give the same mix.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mix ratio must be in (0, 1), got {ratio}")
    if not general:
        raise ValueError("data.mix.data holds no examples")
    rng = random.Random(seed)
    want = round(ratio / (1.0 - ratio) * len(train))
    replace = want > len(general)
    picked = [rng.choice(general) for _ in range(want)] if replace else rng.sample(general, want)
    mixed = list(train) + picked
    rng.shuffle(mixed)
    info = {
        "mix_general_available": len(general),
        "mix_general_used": want,
        "mix_with_replacement": replace,
        "mix_ratio_actual": want / len(mixed) if mixed else 0.0,
    }
    return mixed, info
