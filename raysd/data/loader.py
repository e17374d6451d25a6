"""Step-indexed, rank-sharded batches: batch s of a stage depends only on (seed, s, rank),
so a stage resumed at step s sees exactly the batches an uninterrupted run would."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1):
        self.size, self.seed, self.start, self.stop = size, seed, start, stop
        self.rank, self.world = rank, world
        self.shard = size // world  # equal shards: every rank runs the same number of steps
        self.batch = max(1, min(batch_size, self.shard))
        self.per_epoch = self.shard // self.batch

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.size, generator=g)[self.rank::self.world][: self.shard]
            pos = (step % self.per_epoch) * self.batch
            yield order[pos: pos + self.batch].tolist()


def step_batches(dataset: Dataset, batch_size: int, *, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, stop, rank, world)
    # Pinned batches make the recipe's .to(device, non_blocking=True) an asynchronous copy.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def shard_batches(dataset: Dataset, batch_size: int, rank: int, world: int,
                  workers: int = 0, limit: int = 0) -> DataLoader:
    """Every example (or the first `limit`) exactly once across ranks (for evaluation), in order."""
    size = min(len(dataset), limit) if limit else len(dataset)
    indices = list(range(rank, size, world))
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
