"""Faults with the shipped defaults: a Ray Train worker SIGKILLed in the middle of
self-distillation is restarted by Ray Train and resumes from its step checkpoint, ending with
exactly the metrics of an uninterrupted run; errors that would recur are not retried."""
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from helpers import TINY
from raysd import cli

# Long enough a self-distillation round that the kill lands inside it, on a tiny model.
SLOW_ROUND = ["--set", "self_distill.steps=32", "--set", "self_distill.rounds=1",
              "--set", "logging.checkpoint_every=4"]
SELF_DISTILL = 1  # index of round 1 in the plan [further_pretrain, self_distill 1, finetune]


def checkpoint_position(train_dir: Path) -> tuple[int, int] | None:
    """(plan index, step) of the newest Ray Train checkpoint under a study's train/ folder."""
    newest = None
    for state in train_dir.glob("*/checkpoint_*/state.pt"):
        try:
            loaded = torch.load(state, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):  # being written right now
            continue
        mid_stage = loaded.get("mid_stage") or {}
        position = (loaded["stage_index"], mid_stage.get("step", 0))
        newest = max(newest or position, position)
    return newest


def kill_train_worker_when(train_dir: Path, ready, found: dict) -> threading.Thread:
    """In the background: once `ready(position)` holds, SIGKILL the trial's RayTrainWorker."""
    from ray.util.state import list_actors

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            position = checkpoint_position(train_dir)
            if position and ready(position):
                actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                              ("state", "=", "ALIVE")])
                if actors:
                    os.kill(actors[0].pid, signal.SIGKILL)
                    found["killed_at"] = position
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _trial(study: Path) -> dict:
    return pq.read_table(study / "results" / "trials.parquet").to_pylist()[0]


def test_killed_worker_resumes_with_identical_metrics(ray_local, tmp_path):
    args = ["run", "--space", "demo", *TINY, *SLOW_ROUND, "--storage", str(tmp_path)]
    assert cli.main([*args, "--name", "clean"]) == 0

    found: dict = {}
    watcher = kill_train_worker_when(tmp_path / "killed" / "train",
                                     lambda pos: pos[0] == SELF_DISTILL and pos[1] >= 8, found)
    assert cli.main([*args, "--name", "killed"]) == 0
    watcher.join(timeout=5)
    assert "killed_at" in found, "the worker was never killed"

    clean, killed = _trial(tmp_path / "clean"), _trial(tmp_path / "killed")
    assert killed["status"] == "completed" and killed["restarts"] == 1
    stage, _, rnd, _, step = killed["resumed_from"].split()
    # resumed inside the round (the newest checkpoint on disk may not be registered yet)
    assert (stage, rnd) == ("self_distill", "1") and int(step) > 0
    for metric in ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "init_distance"):
        assert killed[metric] == clean[metric], metric
    history = pq.read_table(tmp_path / "killed" / "results" / "history.parquet").to_pandas()
    rerun = history[(history.stage == "self_distill") & (history.attempt == 1)]
    assert rerun.step.min() > int(step)  # the second attempt started where the checkpoint was
    # a completed trial's step checkpoints are deleted (logging.keep_checkpoints: false)
    assert not any((tmp_path / "killed" / "train").glob("*/checkpoint_*"))
    print(f"worker killed at {found['killed_at']}, resumed from {killed['resumed_from']}; "
          f"val_accuracy {killed['val_accuracy']:.4f} == {clean['val_accuracy']:.4f}, "
          f"val_loss {killed['val_loss']!r} == {clean['val_loss']!r}")


def test_diverged_trial_fails_at_once_without_retries(ray_local, tmp_path, capsys, caplog):
    from ray.util.state import list_actors

    def workers() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))

    before = workers()
    code = cli.main(["run", "--space", "demo", *TINY, "--set", "further_pretrain.lr=1e30",
                     "--set", "further_pretrain.steps=40", "--storage", str(tmp_path), "--name", "nan"])
    assert code == 1
    row = _trial(tmp_path / "nan")
    assert row["status"] == "failed" and "NonFiniteLoss" in row["error"]
    assert workers() - before == 1  # one worker group: Ray Train's default retries were not spent
    # the console has one FAILED line, not Tune's controller traceback
    assert "FAILED: raysd.study.TrialFailed: NonFiniteLoss" in capsys.readouterr().out
    assert not [r for r in caplog.records if r.name == "ray.tune.execution.tune_controller"
                and r.levelno >= logging.ERROR]
