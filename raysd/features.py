"""f(x) over a whole dataset, split across ranks: for the early signal and the teacher cache."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from raysd.data.loader import shard_batches


def autocast(hooks):
    """bf16 autocast where the caller asks for it (GPUs), a no-op otherwise."""
    return torch.autocast(hooks.device.type, dtype=hooks.autocast or torch.bfloat16,
                          enabled=hooks.autocast is not None)


@torch.no_grad()
def represent_all(model: nn.Module, dataset: Dataset, cfg, hooks,
                  limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and y of the first `limit` examples (0 = all), computed in rank shards and summed
    into place, so every rank ends with the whole [N, D] float32 matrix."""
    size = min(len(dataset), limit) if limit else len(dataset)
    feats = torch.zeros(size, getattr(model, "module", model).hidden_size, device=hooks.device)
    labels = torch.zeros(size, dtype=torch.long, device=hooks.device)
    start = hooks.rank
    for batch in shard_batches(dataset, cfg.eval_batch_size, hooks.rank, hooks.world_size,
                               cfg.loader_workers, size):
        batch = {k: v.to(hooks.device) for k, v in batch.items()}
        with autocast(hooks):
            out = getattr(model, "module", model).represent(batch).float()
        rows = torch.arange(start, start + len(out) * hooks.world_size, hooks.world_size)
        feats[rows], labels[rows] = out, batch["y"]
        start += len(out) * hooks.world_size
    hooks.all_reduce(feats)
    hooks.all_reduce(labels)
    return feats, labels
