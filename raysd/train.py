"""Ray Train glue: one worker of one trial. DDP, reports, checkpoints; the method is in recipe.py."""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raysd.config import TrialConfig
from raysd.data import load_task
from raysd.models.weights import load_backbone
from raysd.recipe import Hooks, run_trial

STATE_FILE = "state.pt"


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: resume if a checkpoint exists, then run every stage."""
    cfg: TrialConfig = config["trial"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)

    init = load_backbone(cfg.model, cfg.weights)
    spec = getattr(init, "spec", None)
    task = load_task(cfg.data, image_size=spec.img_size if spec else None,
                     tokenizer=getattr(init, "tokenizer", None), max_length=cfg.max_length)

    def report(metrics: dict, state: dict | None) -> None:
        # ray.train.report is a barrier: every rank calls it; rank 0 alone writes the state.
        if state is None or rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, Path(directory) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(tensor)
        return tensor

    hooks = Hooks(
        device=device, rank=rank, world_size=world, wrap=ray.train.torch.prepare_model,
        all_reduce=all_reduce, report=report, resume=resume,
        autocast=torch.bfloat16 if device.type == "cuda" else None,
    )
    run_trial(cfg, task, init, hooks)
