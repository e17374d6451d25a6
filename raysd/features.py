"""f(x) over a whole dataset, split across ranks: for the early signal and the teacher cache."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CHUNK = 8192  # examples gathered per all-reduce: bounds the device memory of a pass


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself when unwrapped)."""
    return getattr(model, "module", model)


def autocast(hooks):
    """bf16 autocast where the caller asks for it (GPUs), a no-op otherwise."""
    return torch.autocast(hooks.device.type, dtype=hooks.autocast or torch.bfloat16,
                          enabled=hooks.autocast is not None)


def sample_indices(size: int, limit: int, seed: int = 0) -> list[int]:
    """All of range(size), or a fixed random `limit` of it, in order. Random, not the first
    `limit`: splits are often sorted by class."""
    if not limit or limit >= size:
        return list(range(size))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:limit].tolist())


@torch.no_grad()
def represent_all(model: nn.Module, dataset: Dataset, cfg, hooks, indices: list[int] | None = None,
                  out_device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and y of dataset[indices] (default: all), every rank computing a shard of each chunk
    and the chunk summed into place, so every rank ends with the whole [N, D] float32 matrix,
    on `out_device` (default the rank's device; the host keeps what the device cannot)."""
    module = unwrap(model)
    indices = list(range(len(dataset))) if indices is None else indices
    out_device = out_device or hooks.device
    pinned = out_device.type == "cpu" and hooks.device.type == "cuda"
    feats = torch.empty(len(indices), module.hidden_size, device=out_device, pin_memory=pinned)
    labels = torch.empty(len(indices), dtype=torch.long, device=out_device)
    for begin in range(0, len(indices), CHUNK):
        end = min(len(indices), begin + CHUNK)
        part = torch.zeros(end - begin, module.hidden_size, device=hooks.device)
        part_y = torch.zeros(end - begin, dtype=torch.long, device=hooks.device)
        mine = list(range(begin + hooks.rank, end, hooks.world_size))  # positions in `indices`
        chunks = [mine[i: i + cfg.evaluation.batch_size] for i in range(0, len(mine), cfg.evaluation.batch_size)]
        loader = DataLoader(dataset, batch_sampler=[[indices[p] for p in c] for c in chunks],
                            num_workers=cfg.resources.loader_workers, pin_memory=hooks.device.type == "cuda")
        for positions, batch in zip(chunks, loader):
            batch = {k: v.to(hooks.device, non_blocking=True) for k, v in batch.items()}
            with autocast(hooks):
                out = module.represent(batch).float()  # [B, D]
            rows = torch.tensor(positions, device=hooks.device) - begin
            part[rows], part_y[rows] = out, batch["y"]
        hooks.all_reduce(part)
        hooks.all_reduce(part_y)
        feats[begin:end], labels[begin:end] = part.to(out_device), part_y.to(out_device)
    return feats, labels
