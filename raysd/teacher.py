"""The teacher's targets f_teacher(x) for a self-distillation round: cached or live.

The teacher is frozen, in eval mode and fed un-augmented D_u, so f_teacher(x_i) cannot change
within a round. When the round draws more samples than D_u holds, one pass over D_u (split across
ranks) is cheaper than a teacher forward on every batch; the targets are then looked up by
example index. The cache stays on the device while it takes a small share of its memory and is
kept in pinned host memory otherwise.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import Dataset

from raysd.features import represent_all

# The cache may take this share of the device's free memory before it spills to host memory.
DEVICE_SHARE = float(os.environ.get("RAYSD_TEACHER_CACHE_DEVICE_SHARE", "0.2"))


class Indexed(Dataset):
    """D_u whose examples carry their index, the key into the teacher cache."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        return {**self.inner[i], "index": i}


class LiveTargets:
    """The teacher runs on every batch."""

    def __init__(self, teacher: nn.Module, dataset: Dataset):
        self.teacher, self.dataset = teacher, dataset

    def __call__(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher.represent(batch)


class CachedTargets:
    """f_teacher of every example of D_u, computed once; batches look theirs up by index."""

    def __init__(self, table: torch.Tensor, dataset: Dataset, device: torch.device):
        self.table, self.device = table, device  # [N, D]
        self.dataset = Indexed(dataset)

    def __call__(self, batch: dict) -> torch.Tensor:
        index = batch["index"]
        return self.table[index.to(self.table.device)].to(self.device, non_blocking=True)


def uses_cache(setting: str, samples: int, size: int) -> bool:
    """Whether a round caches f_teacher(D_u): `on`, or `auto` when it draws at least len(D_u)."""
    return setting == "on" or (setting == "auto" and samples >= size)


def teacher_targets(teacher: nn.Module, d_u: Dataset, cfg, hooks, samples: int):
    """CachedTargets when the round draws at least len(D_u) samples (`samples`), else live."""
    if not uses_cache(cfg.self_distill.teacher_cache, samples, len(d_u)):
        return LiveTargets(teacher, d_u)
    place = hooks.device
    if place.type == "cuda" and not _fits(len(d_u) * teacher.hidden_size * 4, place):
        place = torch.device("cpu")  # pinned host memory, filled chunk by chunk
    table, _ = represent_all(teacher, d_u, cfg, hooks, out_device=place)
    return CachedTargets(table, d_u, hooks.device)


def _fits(nbytes: int, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free
