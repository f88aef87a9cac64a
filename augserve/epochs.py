"""Epoch plans: which sample ids form which batch, for one rank of one stream.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so every rank of a DDP job
computes the same permutation and takes its own shard, ``order[rank::world_size]``: across
``world_size`` ranks every sample id of the epoch appears exactly once. Shards differ in length by at
most one sample; ``drop_last=True`` trims the epoch so every rank gets the same number of full batches
(what DDP's collectives need), at the price of skipping the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Distinguishes the permutation's seed from the per-sample augmentation seeds (seed, epoch, id).
_ORDER_KEY = 0x0E90C4


@dataclass(frozen=True)
class EpochPlan:
    """``num_samples`` ids ``0..num_samples-1`` cut into batches of ``batch_size`` for ``rank``."""

    num_samples: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"dataset is empty (num_samples={self.num_samples})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_batches() == 0:
            raise ValueError(
                f"no batches: {self.num_samples} samples over {self.world_size} rank(s) with batch_size={self.batch_size}"
                + (" and drop_last" if self.drop_last else "")
            )

    def order(self, epoch: int) -> np.ndarray:
        """All ids of ``epoch`` in visiting order (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, _ORDER_KEY])))
        return rng.permutation(self.num_samples).astype(np.int64)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's ids of ``epoch``."""
        order = self.order(epoch)
        if self.drop_last:
            per_rank = (self.num_samples // self.world_size) // self.batch_size * self.batch_size
            order = order[: per_rank * self.world_size]
        return order[self.rank :: self.world_size]

    def shard_size(self) -> int:
        """Samples per epoch for this rank, computed without building the permutation."""
        if self.drop_last:
            return self.num_batches() * self.batch_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def num_batches(self) -> int:
        """Batches per epoch for this rank (the same every epoch)."""
        if self.drop_last:
            return (self.num_samples // self.world_size) // self.batch_size
        shard = len(range(self.rank, self.num_samples, self.world_size))
        return -(-shard // self.batch_size)

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Sample ids of batch ``index`` of ``epoch``."""
        if not 0 <= index < self.num_batches():
            raise ValueError(f"batch index {index} out of range [0, {self.num_batches()})")
        shard = self.shard(epoch)
        return shard[index * self.batch_size : (index + 1) * self.batch_size]


class BatchIds:
    """``batch_ids(epoch, index)``: the sample ids of one batch of ``plan``, like :meth:`EpochPlan.batch`
    but building each epoch's permutation once (batches are asked for epoch by epoch, many per epoch)."""

    def __init__(self, plan: EpochPlan) -> None:
        self.plan = plan
        self._epoch = -1
        self._shard: np.ndarray | None = None

    def __call__(self, epoch: int, index: int) -> np.ndarray:
        if self._epoch != epoch:
            self._shard, self._epoch = self.plan.shard(epoch), epoch
        size = self.plan.batch_size
        return self._shard[index * size : (index + 1) * size]
