"""Ray Train glue: one worker of one trial. DDP, reports, checkpoints; the method is in recipe.py."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raysd.artifacts import ArtifactStore
from raysd.bootstrap import theta_init
from raysd.chain import Chain
from raysd.config import TrialConfig
from raysd.data import DataError, load_task
from raysd.errors import ConfigError
from raysd.export import describe, model_saver
from raysd.recipe import Hooks, NonFiniteLoss, run_trial
from raysd.trial import fatal_errors, write_fatal

STATE_FILE = "state.pt"


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: resume if a checkpoint exists, then run every stage.

    Errors that would recur on a retry are written to a fatal file of the rank under `run_uri`:
    - a diverged loss, which every rank meets at the same step through an all-reduce: rank 0
      writes it and the ranks return together, so the group ends and Ray Train retries nothing;
    - bad data or weights (ConfigError, DataError), which one rank may meet alone (a path
      missing on its node) while the others wait in a collective: that rank raises, so Ray
      Train's controller tears the whole group down at once instead of after the process
      group's timeout (a single rank just returns). A group Ray Train then restarts finds the
      fatal file and returns before loading anything: the retries left cost one group start.

    With `model_uri` (a folder URI), rank 0 saves the fine-tuned model there (raysd.export)
    before the trial's last report."""
    ctx = ray.train.get_context()
    # Before any fatal file: a node that cannot see the storage could not write one where the
    # driver reads it. Raised, so each retry fails at its start and the last names the node.
    marker = config.get("study_marker")
    if marker and not os.path.exists(marker):
        raise ConfigError(f"storage {Path(marker).parent.parent} is not visible on node "
                          f"{ray.get_runtime_context().get_node_id()[:12]}: a multi-node cluster "
                          "needs shared storage (an NFS mount on every node, s3://, gs://)")
    if fatal_errors(config["run_uri"]):  # an earlier attempt of this trial met a fatal error
        return
    try:
        _run(config["trial"], config.get("artifacts"), config.get("model_uri"), config["run_uri"], ctx,
             config.get("chain"))
    except NonFiniteLoss as err:
        if ctx.get_world_rank() == 0:
            write_fatal(config["run_uri"], 0, err)
    except (ConfigError, DataError) as err:
        write_fatal(config["run_uri"], ctx.get_world_rank(), err)
        if ctx.get_world_size() > 1:  # alone, a rank leaves no one waiting: no restart to pay
            raise


def _run(cfg: TrialConfig, artifacts: str | None, model_uri: str | None, run_uri: str, ctx,
         chain: Chain | None = None) -> None:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

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
                     augment=cfg.finetune.augment, val_fraction=cfg.evaluation.val_fraction,
                     image_resize=cfg.image_resize)
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
        # Owned by the trial's run folder: stable across restarts, unique among the studies
        # that share one store (trial ids such as trial_0003 repeat from study to study).
        artifacts=ArtifactStore(artifacts, owner=run_uri) if artifacts else None,
        save_model=model_saver(model_uri, describe(cfg, task, init)) if model_uri else None,
    )
    run_trial(cfg, task, init, hooks, chain)


def _node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    nodes: list = [None] * world
    dist.all_gather_object(nodes, mine)
    return nodes
