"""StudyRecorder driven by hand, without Ray: what an ended trial or an ended study leaves."""
from __future__ import annotations

import tempfile
import types
from pathlib import Path

from raysd.results import StudyRecorder
from raysd.spaces import load_space

DONE = {"stage": "finetune", "round": 0, "step": 8, "progress": 40, "loss": 0.5,
        "val_accuracy": 0.8, "trial_done": True}


def _trial(tid: str, tmp_path: Path, error: str | None = None) -> types.SimpleNamespace:
    error_file = None
    if error:
        error_file = tmp_path / f"{tid}.error.txt"
        error_file.write_text(f"Traceback ...\nraysd.trial.TrialFailed: {error}\n")
    return types.SimpleNamespace(trial_id=tid, config={"trial_id": tid}, error_file=error_file and str(error_file),
                                 last_result=DONE if error is None else {})


def _checkpointed(study: Path, tid: str, *extra: str) -> Path:
    """A trial's train/ folder as Ray Train leaves it: a step checkpoint and `extra` files."""
    folder = study / "train" / tid
    (folder / "checkpoint_000000").mkdir(parents=True)
    (folder / "checkpoint_000000" / "state.pt").write_bytes(b"weights")
    for name in extra:
        (folder / name).write_text("ConfigError: data 'x': directory x does not exist")
    return folder


def _end(recorder: StudyRecorder, trial, how: str) -> None:
    recorder.on_trial_start(0, [], trial)
    recorder.on_trial_result(0, [], trial, {**DONE, "trial_done": False})
    if how == "complete":
        recorder.on_trial_complete(0, [], trial)
    else:
        recorder.on_trial_error(0, [], trial)


def test_final_trials_lose_their_checkpoints_and_a_resumable_failure_keeps_them(tmp_path):
    study = tmp_path / "study"
    recorder = StudyRecorder(load_space("demo"), str(study))
    recorder.setup()
    done, stopped = _checkpointed(study, "done"), _checkpointed(study, "stopped")
    fatal = _checkpointed(study, "fatal", "fatal_error.rank1.txt")
    crashed = _checkpointed(study, "crashed", "worker_error.txt")
    running = _checkpointed(study, "running")
    _end(recorder, _trial("done", tmp_path), "complete")
    assert not done.exists()  # deleted when the trial ends, not at the study's end
    stopped_trial = _trial("stopped", tmp_path)
    stopped_trial.last_result = {**DONE, "trial_done": False}  # ASHA ended it early
    _end(recorder, stopped_trial, "complete")
    _end(recorder, _trial("fatal", tmp_path, "ConfigError on rank 1: data"), "error")
    _end(recorder, _trial("crashed", tmp_path, "RayActorError: died (traceback: ...)"), "error")
    assert not stopped.exists() and not fatal.exists()
    assert (crashed / "checkpoint_000000").is_dir()  # --resume retries it from there
    assert (running / "checkpoint_000000").is_dir()
    (stopped / "checkpoint_000001").mkdir(parents=True)  # written by its workers as they stopped
    recorder.on_experiment_end([])
    assert not stopped.exists()
    assert sorted(p.name for p in (study / "train").iterdir()) == ["crashed", "running"]

    kept = tmp_path / "kept"
    recorder = StudyRecorder(load_space("demo", {"logging.keep_checkpoints": True}), str(kept))
    recorder.setup()
    folder = _checkpointed(kept, "done")
    _end(recorder, _trial("done", tmp_path), "complete")
    recorder.on_experiment_end([])
    assert (folder / "checkpoint_000000" / "state.pt").exists()


def test_the_tensorboard_staging_folder_goes_with_the_study(tmp_path, monkeypatch):
    """With remote storage, events are staged in a local temporary folder, removed when the
    study ends (pyarrow's mock:// filesystem stands for a bucket)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    recorder = StudyRecorder(load_space("demo"), "mock:///bucket/study")
    recorder.setup()
    _end(recorder, _trial("t1", tmp_path), "complete")
    assert [p.name[:9] for p in (tmp_path / "tmp").iterdir()] == ["raysd-tb-"]
    recorder.on_experiment_end([])
    assert recorder.results.store.list("tensorboard", "t1")  # the events were uploaded first
    assert list((tmp_path / "tmp").iterdir()) == []
