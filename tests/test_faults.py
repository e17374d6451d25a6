"""Faults with the shipped defaults: a Ray Train worker SIGKILLed in the middle of
self-distillation is restarted by Ray Train and resumes from its step checkpoint, ending with
exactly the metrics of an uninterrupted run; errors that would recur are not retried, and an
error on one rank ends the trial at once."""
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from helpers import RANK_FAULT, SLOW_ROUND, TINY, train_worker_count
from raysd import cli

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
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # the session's Ray, not another on the host

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            position = checkpoint_position(train_dir)
            if position and ready(position):
                actors = list_actors(address=address, filters=[
                    ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
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


def test_killed_worker_resumes_with_identical_metrics(ray_local, slow_round_reference, tmp_path):
    """One of a 2-worker trial's RayTrainWorkers is killed; the uninterrupted run it must match
    is the session's slow_round_reference (the same flags, on one node)."""
    found: dict = {}
    watcher = kill_train_worker_when(tmp_path / "killed" / "train",
                                     lambda pos: pos[0] == SELF_DISTILL and pos[1] >= 8, found)
    assert cli.main(["run", "--space", "demo", *TINY, *SLOW_ROUND, "--workers", "2",
                     "--storage", str(tmp_path), "--name", "killed"]) == 0
    watcher.join(timeout=5)
    assert "killed_at" in found, "the worker was never killed"

    clean, killed = slow_round_reference, _trial(tmp_path / "killed")
    assert clean["cfg.resources.workers"] == killed["cfg.resources.workers"] == 2
    assert killed["status"] == "completed" and killed["restarts"] == 1
    stage, _, rnd, _, step = killed["resumed_from"].split()
    # resumed inside the round (the newest checkpoint on disk may not be registered yet)
    assert (stage, rnd) == ("self_distill", "1") and int(step) > 0
    for metric in ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "init_distance"):
        assert killed[metric] == clean[metric], metric
    history = pq.read_table(tmp_path / "killed" / "results" / "history").to_pandas()
    rerun = history[(history.stage == "self_distill") & (history.attempt == 1)]
    assert rerun.step.min() > int(step)  # the second attempt started where the checkpoint was
    # a completed trial's step checkpoints are deleted (logging.keep_checkpoints: false)
    assert not any((tmp_path / "killed" / "train").glob("*/checkpoint_*"))
    print(f"worker killed at {found['killed_at']}, resumed from {killed['resumed_from']}; "
          f"val_accuracy {killed['val_accuracy']:.4f} == {clean['val_accuracy']:.4f}, "
          f"val_loss {killed['val_loss']!r} == {clean['val_loss']!r}")


def test_diverged_trial_fails_at_once_without_retries(diverged_trial):
    """The session's diverged run (test_study reads its failure reason)."""
    assert diverged_trial.code == 1
    row = _trial(diverged_trial.study)
    assert row["status"] == "failed" and "NonFiniteLoss" in row["error"]
    assert diverged_trial.new_train_workers == 1  # one worker group: Ray Train's default retries were not spent
    assert not (diverged_trial.study / "train" / row["trial_id"]).exists()  # final: checkpoints deleted
    # the console has one FAILED line, not Tune's controller traceback
    assert "FAILED: raysd.trial.TrialFailed: NonFiniteLoss" in diverged_trial.out
    assert not [r for r in diverged_trial.records if r.name == "ray.tune.execution.tune_controller"
                and r.levelno >= logging.ERROR]


def test_error_on_one_rank_ends_the_trial_at_once(ray_local, tmp_path):
    """Rank 1 alone finds its data folder missing (as on a node without the mount) while rank 0
    waits for it in a collective: the trial fails with rank 1's message within a minute or so,
    not after the process group's 30-minute timeout times Ray Train's retries."""
    missing = tmp_path / "mount-absent-on-this-node"
    RANK_FAULT.write_text(json.dumps({"rank": 1, "data": f"imagefolder:{missing}"}))
    # A hang guard only: Ctrl-C makes Tune stop the trial and return, so the asserts report it.
    guard = threading.Timer(180, os.kill, (os.getpid(), signal.SIGINT))
    address = ray_local.get_runtime_context().gcs_address
    before, started = train_worker_count(address), time.time()
    guard.start()
    try:
        code = cli.main(["run", "--space", "demo", *TINY, "--workers", "2",
                         "--storage", str(tmp_path), "--name", "rank1"])
    finally:
        guard.cancel()
        RANK_FAULT.unlink()
    seconds = time.time() - started
    assert (tmp_path / "rank1" / "results" / "trials.parquet").exists(), f"no trial ended in {seconds:.0f} s"
    row = _trial(tmp_path / "rank1")
    assert code == 1 and row["status"] == "failed"
    assert row["error"].endswith(f"ConfigError on rank 1: data 'imagefolder:{missing}': "
                                 f"directory {missing} does not exist"), row["error"]
    # The failed group and one restart that returned at once: the second retry was not spent, and
    # Tune ran the trial once (its max_failures is 0).
    assert train_worker_count(address) - before == 4
    assert not (tmp_path / "rank1" / "train" / row["trial_id"]).exists()  # final: checkpoints deleted
    assert seconds < 120, f"{seconds:.0f} s"
    print(f"rank 1's error ended the trial in {seconds:.1f} s")
