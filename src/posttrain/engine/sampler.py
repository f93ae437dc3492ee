"""Deterministic, resumable, distributed-aware batch order.

Epoch e's order is a permutation seeded by (seed, e), so a resumed run that knows
(epoch, batch index) continues exactly where it stopped. Each global batch of
`batch_size * world_size` items is split so rank r takes a disjoint slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # index of the next global batch within the epoch


class BatchSampler:
    def __init__(self, n_items: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if n_items <= 0:
            raise ValueError("no training items: the dataset is empty after filtering")
        if n_items < world_size:
            raise ValueError(f"{n_items} training items for {world_size} ranks: every rank needs at least one")
        self.n = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world = world_size
        self.pos = Position()

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size * self.world)
        # a last, short global batch is split over the ranks; with fewer items than ranks some rank
        # would get none (and an empty forward), so that remainder is left out of the epoch
        return full + (1 if rest >= self.world else 0)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Indices of this rank's share of the next global batch (moves the position)."""
        if self.pos.batch >= self.batches_per_epoch:
            self.pos = Position(self.pos.epoch + 1, 0)
        order = self._order(self.pos.epoch)
        gb = self.batch_size * self.world
        batch = order[self.pos.batch * gb:(self.pos.batch + 1) * gb]  # short at the end of an epoch
        self.pos = Position(self.pos.epoch, self.pos.batch + 1)
        # contiguous near-equal shares: batch_size each for a full batch; the engine's token-level
        # normalization keeps unequal shares of a short batch equal to one process's step
        k, extra = divmod(len(batch), self.world)
        start = self.rank * k + min(self.rank, extra)
        return batch[start:start + k + (1 if self.rank < extra else 0)]

    def state_dict(self) -> dict:
        # samples consumed in the epoch, not batches: a resume on another number of ranks keeps its place
        return {"epoch": self.pos.epoch, "batch": self.pos.batch,
                "samples": self.pos.batch * self.batch_size * self.world}

    def load_state_dict(self, s: dict) -> None:
        gb = self.batch_size * self.world
        samples = int(s.get("samples", int(s["batch"]) * gb))
        if samples % gb:
            raise ValueError(f"cannot resume at sample {samples} of the epoch with a global batch of {gb} "
                             f"({self.batch_size} per rank x {self.world} ranks): it must divide evenly")
        self.pos = Position(int(s["epoch"]), samples // gb)
