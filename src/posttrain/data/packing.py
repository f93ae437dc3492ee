"""Best-fit-decreasing packing of examples into fixed-length rows.

Sorting by length (longest first) and putting each example into the fullest row that still has
room is the classic bin-packing heuristic: it uses at most 11/9·OPT + 6/9 rows (Dósa 2007), and
on typical SFT length distributions it fills rows to well over 90%.
"""

from __future__ import annotations

import bisect


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `capacity`.

    Deterministic: ties are broken by index. Rows are returned in creation order and the
    indices inside a row in placement order (longest first).
    """
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > row capacity {capacity}; truncate or drop it first")
        if n <= 0:
            raise ValueError(f"item {i} has length {n}; every packed example needs at least one token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (space left, row id), kept sorted: the best fit is the first entry with space >= length
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            left, r = free.pop(k)
        else:
            left, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    return rows


def packing_efficiency(lengths: list[int], rows: list[list[int]], capacity: int) -> float:
    """Real tokens / row tokens (1.0 means no padding at all)."""
    if not rows:
        return 0.0
    return sum(lengths) / (len(rows) * capacity)
