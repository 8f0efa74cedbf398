"""Samplers whose order depends only on (seed, epoch, rank), and the resumable training loader.

Training items are addressed as ``(epoch, index)`` so the dataset can seed each sample's augmentation from
(seed, epoch, index): augmentation is then independent of worker count, worker seeds and resume points.
``ResumableLoader`` tells Lightning where in which epoch a checkpoint was taken, so a run resumed from any
checkpoint (epoch end, or mid-epoch after SIGTERM/Ctrl-C) continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


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
    ``skip`` items of the current epoch are left out once (a run resumed mid-epoch); a new epoch clears it.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip  # read once
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        total = len(self) * self.world_size
        order += order[: total - self.n]
        for i in order[self.rank:total:self.world_size][skip:]:
            yield (epoch, i)


class ShardSampler(Sampler):
    """Evaluation order ``rank, rank + world_size, ...`` without padding: under DDP every image is scored once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))


class SizeGroupedBatches(Sampler):
    """Evaluation batches of equal-sized images: this rank's shard (``rank, rank + world_size, ...``, as
    ``ShardSampler``), grouped by image size in order of first appearance, cut into batches of at most
    ``batch_size``. Every image is scored once and never padded, so predictions (and metrics) do not depend on
    the batch size; VOC has few distinct sizes, so most batches are full."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        groups: dict[tuple[int, int], list[int]] = {}
        for index in ShardSampler(len(sizes), rank, world_size):
            groups.setdefault(tuple(sizes[index]), []).append(index)
        self.batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])


Progress = Callable[[], tuple[int, int]]


def epoch_position(trainer: Any) -> tuple[int, int]:
    """(batches trained in the current epoch, batches per epoch), as Lightning counts them: the position a
    mid-epoch checkpoint resumes from (its workers fetch ahead, so the loader cannot count this itself)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed, int(trainer.num_training_batches)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over an ``EpochShuffleSampler`` whose position Lightning saves in checkpoints.

    Lightning stores ``state_dict()`` of a loader that has one and calls ``load_state_dict`` on resume before it
    creates the first iterator. The state is ``{"epoch": e, "batches": k}``: the next batch to train is batch k of
    epoch e. ``progress()`` returns (batches trained in the current epoch, batches per epoch) from the trainer, not
    from this loader, whose workers fetch ahead of training.
    """

    def __init__(self, *args: Any, progress: Progress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableLoader needs an EpochShuffleSampler")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch
        done, total = self.progress() if self.progress is not None else (0, len(self))
        if done >= total:  # the epoch is over: resume at the start of the next one
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.skip = int(state["batches"]) * int(self.batch_size or 1)
