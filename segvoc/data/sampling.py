"""Samplers whose order depends only on (seed, epoch, rank): resuming a run replays the same data.

Training items are addressed as ``(epoch, index)`` so the dataset can seed each sample's augmentation from
(seed, epoch, index): augmentation is then independent of worker count, worker seeds and resume points.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64-style), stable across processes and Python versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler):
    """Shuffles ``range(n)`` with a permutation drawn from (seed, epoch); yields ``(epoch, index)``.

    Under DDP each rank takes every ``world_size``-th item of the same permutation (padded by wrapping so all
    ranks see the same number of items, like ``DistributedSampler``). Lightning calls ``set_epoch``.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        total = len(self) * self.world_size
        order += order[: total - self.n]
        for i in order[self.rank:total:self.world_size]:
            yield (self.epoch, i)


class ShardSampler(Sampler):
    """Evaluation order ``rank, rank + world_size, ...`` without padding: under DDP every image is scored once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))
