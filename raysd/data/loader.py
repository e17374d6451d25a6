"""Step-indexed, rank-sharded batches: batch s of a stage depends only on (seed, s, rank),
so a stage resumed at step s sees exactly the batches an uninterrupted run would."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, seed) pairs; the seed is a function of (seed, step, rank, position)."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1):
        self.size, self.seed, self.start, self.stop = size, seed, start, stop
        self.rank, self.world = rank, world
        self.shard = size // world  # equal shards: every rank runs the same number of steps
        self.batch = max(1, min(batch_size, self.shard))
        self.per_epoch = self.shard // self.batch

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.size, generator=g)[self.rank::self.world][: self.shard]
            pos = (step % self.per_epoch) * self.batch
            indices = order[pos: pos + self.batch].tolist()
            seeds = np.random.SeedSequence([self.seed, step, self.rank]).generate_state(
                len(indices), np.uint64).tolist()
            yield list(zip(indices, seeds))


class Seeded(Dataset):
    """dataset[(i, seed)] is dataset[i] read with torch's global RNG seeded by `seed`, so random
    augmentation replays on resume and in any loader worker; the RNG is restored after."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        rng = torch.default_generator  # torch.manual_seed also seeds every device: ~100x slower
        state = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.inner[i]
        finally:
            rng.set_state(state)


def step_batches(dataset: Dataset, batch_size: int, *, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, stop, rank, world)
    # Pinned batches make the recipe's .to(device, non_blocking=True) an asynchronous copy.
    return DataLoader(Seeded(dataset), batch_sampler=sampler, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def shard_batches(dataset: Dataset, batch_size: int, rank: int, world: int,
                  workers: int = 0, limit: int = 0) -> DataLoader:
    """Every example (or the first `limit`) exactly once across ranks (for evaluation), in order."""
    size = min(len(dataset), limit) if limit else len(dataset)
    indices = list(range(rank, size, world))
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
