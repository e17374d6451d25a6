"""Two DDP ranks (gloo, two processes) run the recipe and end with identical parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raysd import models
    from raysd.data import load_task
    from raysd.recipe import Hooks, run_trial

    finals, states = [], []

    def wrap(model):
        wrapped = DistributedDataParallel(model)
        finals.append(wrapped)
        return wrapped

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    def report(metrics, state):
        if state is not None and "mid_stage" not in state:  # a stage boundary
            states.append(state["theta"])

    from raysd.artifacts import ArtifactStore

    torch.manual_seed(0)  # same theta_init on both ranks, as a shared checkpoint would give
    init = models.build("vit_tiny")
    task = load_task("builtin:digits", image_size=32)

    def trial(cfg, store=None):
        return run_trial(cfg, task, init, Hooks(rank=rank, world_size=world, wrap=wrap,
                                                all_reduce=all_reduce, report=report, artifacts=store))

    # The teacher's targets are gathered from both ranks' shards; stages go to a shared store.
    store = ArtifactStore(f"{out_dir}/artifacts", owner="trial-a")
    out = trial(tiny_config({"self_distill.rounds": 1, "self_distill.teacher_cache": "on"}), store)
    classifier, teacher = finals[-1].module.state_dict(), states[-1]
    live = trial(tiny_config({"self_distill.rounds": 1, "self_distill.teacher_cache": "off"}))
    again = trial(tiny_config({"self_distill.rounds": 1, "self_distill.teacher_cache": "on"}), ArtifactStore(store.uri, owner="trial-b"))
    torch.save({"classifier": classifier, "teacher": teacher, "metrics": out, "live": live,
                "again": again}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_end_with_identical_parameters_and_whole_split_metrics(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("classifier", "teacher"):
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part])
    # evaluation covers the whole split on every rank: the same numbers everywhere
    assert r0["metrics"]["val_accuracy"] == r1["metrics"]["val_accuracy"]
    assert r0["metrics"]["test_loss"] == r1["metrics"]["test_loss"]
    assert r0["metrics"]["knn_accuracy_self_distill_1"] == r1["metrics"]["knn_accuracy_self_distill_1"]
    # The cache built from two shards trains like the live teacher...
    assert r0["live"]["val_loss"] == pytest.approx(r0["metrics"]["val_loss"], rel=1e-4)
    # ...and a second trial on both ranks loads both stages rank 0 found, with the same result.
    for r in (r0, r1):
        assert r["again"]["reused_further_pretrain"] and r["again"]["reused_self_distill_1"]
        assert r["again"]["val_loss"] == r["metrics"]["val_loss"]
