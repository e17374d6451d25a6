"""Ray Train glue: one worker of one trial. DDP, reports, checkpoints; the method is in recipe.py."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raysd.artifacts import ArtifactStore
from raysd.bootstrap import theta_init
from raysd.config import TrialConfig
from raysd.data import DataError, load_task
from raysd.errors import ConfigError
from raysd.export import describe, model_saver
from raysd.recipe import Hooks, NonFiniteLoss, run_trial

STATE_FILE = "state.pt"
# Where rank 0 leaves an error that a retry would only repeat; the trial driver fails on it.
FATAL_FILE = "fatal_error.txt"


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: resume if a checkpoint exists, then run every stage.

    Errors that every rank meets alike and that would recur on a retry (bad data or weights, a
    diverged loss, which all ranks see through an all-reduce) are written to `fatal_file` and
    the workers return, because Ray Train retries every exception a worker raises.

    With `model_uri` (a folder URI), rank 0 saves the fine-tuned model there (raysd.export)
    before the trial's last report."""
    ctx = ray.train.get_context()
    try:
        _run(config["trial"], config.get("study_marker"), config.get("artifacts"),
             config.get("model_uri"), ctx)
    except (ConfigError, NonFiniteLoss, DataError) as err:
        # Met alike by every rank: the data (a corrupt image is found when a node decodes the
        # folder into its cache, before training) and weights are loaded by each.
        if ctx.get_world_rank() == 0:
            line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            fs, path = pafs.FileSystem.from_uri(config["fatal_file"])
            with fs.open_output_stream(path) as f:
                f.write(f"{type(err).__name__}: {line}".encode())


def _run(cfg: TrialConfig, study_marker: str | None, artifacts: str | None,
         model_uri: str | None, ctx) -> None:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if study_marker and not os.path.exists(study_marker):
        raise ConfigError(f"storage {Path(study_marker).parent.parent} is not visible on node "
                          f"{ray.get_runtime_context().get_node_id()[:12]}: a multi-node cluster "
                          "needs shared storage (an NFS mount on every node, s3://, gs://)")

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # Tensors and plain values only: a checkpoint on shared storage cannot run code.
            resume = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)

    # Hub downloads (hf:, timm:) and the demo's cache are made once per node: its local rank 0
    # loads first while the node's other ranks wait, then read the cache it filled.
    first = ctx.get_local_rank() == 0
    if first:
        init = theta_init(cfg.model, cfg.weights, cfg.seed)
    if world > 1:
        dist.barrier()
    if not first:
        init = theta_init(cfg.model, cfg.weights, cfg.seed)
    spec = getattr(init, "spec", None)
    task = load_task(cfg.data, image_size=spec.img_size if spec else None,
                     tokenizer=getattr(init, "tokenizer", None), max_length=cfg.max_length,
                     augment=cfg.finetune.augment, val_fraction=cfg.evaluation.val_fraction)
    nodes = _node_ids(world)
    # Worker-group restarts so far; recipe.run_trial counts the same in its summary.
    attempt = resume["summary"].get("restarts", 0) + 1 if resume else 0

    def report(metrics: dict, state: dict | None) -> None:
        metrics = {**metrics, "attempt": attempt}
        if metrics.get("trial_done"):  # the trial's last row: where its ranks ran
            metrics = {**metrics, "worker_nodes": ",".join(nodes), "num_nodes": len(set(nodes))}
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

    if device.type == "cuda":  # fp32 is the paper's; tf32 matmuls trade bits for speed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    hooks = Hooks(
        device=device, rank=rank, world_size=world, wrap=ray.train.torch.prepare_model,
        all_reduce=all_reduce, report=report, resume=resume,
        autocast=torch.bfloat16 if device.type == "cuda" and cfg.precision == "bf16" else None,
        # Named after the trial (stable across restarts): a restarted trial keeps its leases.
        artifacts=ArtifactStore(artifacts, owner=ctx.get_experiment_name()) if artifacts else None,
        save_model=model_saver(model_uri, describe(cfg, task, init)) if model_uri else None,
    )
    run_trial(cfg, task, init, hooks)


def _node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    nodes: list = [None] * world
    dist.all_gather_object(nodes, mine)
    return nodes
