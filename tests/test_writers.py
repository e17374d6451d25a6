"""The Ray-free results writers, driven directly and read back with pyarrow and TensorBoard."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import metadata

from raysd.spaces import load_space
from raysd.storage import Store
from raysd.study_folder import StudyFolder
from raysd.writers import EventFile, ResultsWriter, TensorBoardWriter, history_row


def _rows(tid: str, steps, stage: str = "further_pretrain", attempt: int = 0) -> list[dict]:
    return [history_row(tid, {"stage": stage, "round": 0, "step": s, "progress": s, "attempt": attempt,
                              "loss": 1.0 / s, "node_ip": "ignored"}) for s in steps]


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _history(study: Path) -> list[dict]:
    """The history dataset as pyarrow reads the folder, without raysd; missing values left out."""
    table = pq.read_table(study / "results" / "history")
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


def _parts(study: Path) -> list[str]:
    folder = study / "results" / "history"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_running_trials_rows_reach_its_history_parts_before_it_ends(tmp_path):
    writer = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2, 3)):
        writer.add("t1", row)
    assert writer.flush()  # parts are due at every flush with part_seconds 0
    # The latest row waits for the next: a stage's summary reports it again (recipe.run_trial).
    assert _parts(tmp_path) == ["t1-00000.parquet"] and _history(tmp_path) == _rows("t1", (1, 2))
    writer.add("t1", {**_rows("t1", (3,))[0], "knn_accuracy": 0.5})  # step 3 again, with the signal
    writer.add("t1", _rows("t1", (4,))[0])
    writer.flush()
    assert _parts(tmp_path) == ["t1-00000.parquet", "t1-00001.parquet"]
    assert _history(tmp_path) == _rows("t1", (1, 2)) + [{**_rows("t1", (3,))[0], "knn_accuracy": 0.5}]
    assert not (tmp_path / "results" / "trials.parquet").exists()  # no trial has ended
    assert [r["step"] for r in StudyFolder(str(tmp_path)).history_rows()] == [1, 2, 3]


def test_parts_wait_for_their_period_and_close_writes_what_is_left(tmp_path):
    writer = ResultsWriter(str(tmp_path), part_seconds=3600)
    writer.add("t1", _rows("t1", (1,))[0])
    assert not writer.flush() and _parts(tmp_path) == []
    writer.close()  # the study stops (Ctrl-C) with t1 running: its rows wait for --resume
    assert _history(tmp_path) == _rows("t1", (1,))


def test_history_is_one_table_of_one_schema_whose_files_are_never_rewritten(tmp_path):
    """pandas and pyarrow.dataset read the folder as one table with every column, though no part
    holds them all; more trials add files and never touch a written one (a write costs its rows)."""
    import pandas as pd
    import pyarrow.dataset as ds

    writer = ResultsWriter(str(tmp_path), part_seconds=0, metrics=["val_accuracy", "test_accuracy"])
    history = tmp_path / "results" / "history"
    written: dict[str, tuple] = {}
    for n in range(6):
        tid = f"t{n}"
        for row in _rows(tid, range(1, 5)):
            writer.add(tid, row)
        writer.flush()
        writer.add(tid, {**_rows(tid, (4,))[0], "val_accuracy": n / 10, "test_accuracy": 0.5})
        writer.end_trial({"trial_id": tid, "status": "completed"})
        writer.flush()
        files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in history.iterdir()}
        assert all(files[name] == seen for name, seen in written.items())  # never rewritten
        assert len(files) == len(written) + 2  # the trial's rows: two parts, nothing else
        written = files
    frame = pd.read_parquet(history)
    assert len(frame) == 6 * 4 and frame.duplicated(["trial_id", "step"]).sum() == 0
    assert list(frame.columns[:3]) == ["trial_id", "stage", "round"]
    assert {"val_accuracy", "test_accuracy", "knn_accuracy"} <= set(frame.columns)
    finals = frame[frame.val_accuracy.notna()]
    assert finals.trial_id.tolist() == [f"t{n}" for n in range(6)] and finals.step.tolist() == [4] * 6
    assert ds.dataset(history).to_table().num_rows == 24
    assert [r["trial_id"] for r in _read(tmp_path / "results" / "trials.parquet")] == [f"t{n}" for n in range(6)]


def test_a_new_writer_picks_up_a_crashed_drivers_parts(tmp_path):
    crashed = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2, 3)):
        crashed.add("t1", row)
    crashed.end_trial({"trial_id": "t0", "status": "failed"})
    crashed.flush()  # then killed: step 3 waited in memory
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    assert [r["step"] for r in StudyFolder(str(tmp_path)).history_rows()] == [1, 2]
    for row in _rows("t1", (3, 4)):  # t1 runs again from its checkpoint after step 2
        resumed.add("t1", row)
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert [r["trial_id"] for r in _read(tmp_path / "results" / "trials.parquet")] == ["t0", "t1"]
    assert [r["step"] for r in _history(tmp_path)] == [1, 2, 3, 4]
    assert _parts(tmp_path) == ["t1-00000.parquet", "t1-00001.parquet"]  # appended, no step twice


def test_a_failed_trial_run_again_by_resume_keeps_one_row_per_step(tmp_path):
    """--resume runs a failed trial again from its last checkpoint: the steps it repeats replace
    the failed run's rows in one part of its own, and its trials.parquet row is replaced."""
    first = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in [*_rows("t1", (1, 2, 3)), *_rows("t2", (1,))]:
        first.add(row["trial_id"], row)
    first.end_trial({"trial_id": "t1", "status": "failed"})
    first.end_trial({"trial_id": "t2", "status": "completed"})
    first.flush()
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (3, 4)):  # from the checkpoint after step 2
        resumed.add("t1", {**row, "loss": 9.0})
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert _read(tmp_path / "results" / "trials.parquet") == [
        {"trial_id": "t2", "status": "completed"}, {"trial_id": "t1", "status": "completed"}]
    history = _history(tmp_path)
    assert [(r["trial_id"], r["step"], r["loss"]) for r in history] == [
        ("t1", 1, 1.0), ("t1", 2, 0.5), ("t1", 3, 9.0), ("t1", 4, 9.0), ("t2", 1, 1.0)]
    assert _parts(tmp_path) == ["t1-00002.parquet", "t2-00000.parquet"]  # one part; t2 untouched


def test_a_crashs_temporary_files_never_break_resume_or_drop_rows(tmp_path):
    """A driver killed inside Store.write_bytes leaves `.<name>.tmp-<hex>` beside the file
    (earlier raysd: without the dot); readers of the folder as a dataset skip it."""
    crashed = ResultsWriter(str(tmp_path), part_seconds=0)
    crashed.add("t1", _rows("t1", (1,))[0])
    crashed.end_trial({"trial_id": "t0", "status": "failed"})
    crashed.close()
    results, parts = tmp_path / "results", tmp_path / "results" / "history"
    for leftover in (parts / ".t1-00001.parquet.tmp-0badc0de", results / "trials.parquet.tmp-1234abcd"):
        leftover.write_bytes(b"PAR1 cut short")
    assert _history(tmp_path) == _rows("t1", (1,))
    assert [(r["trial_id"], r["step"]) for r in StudyFolder(str(tmp_path)).history_rows()] == [("t1", 1)]
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    resumed.add("t1", _rows("t1", (2,))[0])
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert _parts(tmp_path) == ["t1-00000.parquet", "t1-00001.parquet"]
    assert [r["trial_id"] for r in _read(results / "trials.parquet")] == ["t0", "t1"]
    assert [r["step"] for r in _history(tmp_path)] == [1, 2]
    assert not list(results.rglob("*.tmp-*"))  # nothing left behind


def test_an_old_layout_study_reads_and_resumes_without_a_rewrite(tmp_path):
    """Studies written before the dataset: history.parquet (ended trials) and history_parts/
    (running ones). Both stay as they are; the rows a resumed study adds go to the dataset, and
    raysd reads all of them as one history, each row once."""
    store = Store(str(tmp_path))
    store.write_rows(_rows("t0", (1, 2)), "results", "history.parquet")
    store.write_rows(_rows("t1", (1, 2)), "results", "history_parts", "t1-00000.parquet")
    store.write_rows([{"trial_id": "t0", "status": "completed"}], "results", "trials.parquet")
    old = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("history*.parquet")}
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    assert [(r["trial_id"], r["step"]) for r in StudyFolder(str(tmp_path)).history_rows()] == [
        ("t0", 1), ("t0", 2), ("t1", 1), ("t1", 2)]
    for row in _rows("t1", (3,)):
        resumed.add("t1", row)
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert {p: p.stat().st_mtime_ns for p in old} == old
    assert [(r["trial_id"], r["step"]) for r in StudyFolder(str(tmp_path)).history_rows()] == [
        ("t0", 1), ("t0", 2), ("t1", 1), ("t1", 2), ("t1", 3)]


def test_trials_parquet_is_written_at_the_first_end_then_once_a_period_and_at_close(tmp_path):
    """Rewritten whole, trials.parquet is written when the first trial ends, then at most once
    every part_seconds however many end (not once per end: O(n^2) writes per study), and at close."""
    writer = ResultsWriter(str(tmp_path), part_seconds=3600)
    trials = tmp_path / "results" / "trials.parquet"
    writer.end_trial({"trial_id": "t0", "status": "completed", "val_accuracy": 0.5})
    writer.flush()
    assert [r["trial_id"] for r in pq.read_table(trials).to_pylist()] == ["t0"]
    for tid in ("t1", "t2"):
        writer.end_trial({"trial_id": tid, "status": "completed", "val_accuracy": 0.6})
        writer.flush()
    assert [r["trial_id"] for r in pq.read_table(trials).to_pylist()] == ["t0"]  # not due yet
    writer.close()  # the study's end (or Ctrl-C) writes what waited
    assert [r["trial_id"] for r in pq.read_table(trials).to_pylist()] == ["t0", "t1", "t2"]
    eager = ResultsWriter(str(tmp_path / "eager"), part_seconds=0)  # due at every flush
    eager.end_trial({"trial_id": "t0", "status": "completed", "val_accuracy": 0.5})
    eager.flush()
    eager.end_trial({"trial_id": "t1", "status": "completed", "val_accuracy": 0.5})
    eager.flush()
    assert len(pq.read_table(tmp_path / "eager" / "results" / "trials.parquet")) == 2


def test_keep_best_model_keeps_the_best_ended_trial_and_running_ones(tmp_path):
    writer = ResultsWriter(str(tmp_path))
    for tid in ("t0", "t1", "t2", "t3", "running"):
        (tmp_path / "models" / tid).mkdir(parents=True)
    for tid, status, value in (("t0", "completed", 0.7), ("t1", "completed", 0.9),
                               ("t2", "stopped", 0.99), ("t3", "completed", 0.9)):
        writer.end_trial({"trial_id": tid, "status": status, "val_accuracy": value})
    writer.keep_best_model("val_accuracy", "max")  # t1 and t3 tie: the first to end wins
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["running", "t1"]


def _scalars(path: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _open_files(under: Path) -> list[str]:
    """This process's open files below `under`."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while listed
            continue
        if target.startswith(str(under)):
            found.append(target)
    return found


def test_an_event_file_cut_short_by_a_crash_reads_up_to_its_last_whole_record(tmp_path):
    events = EventFile(tmp_path, flush_secs=0)  # flushed at every summary
    for step in (1, 2, 3):
        events.add_summary(Summary(value=[Summary.Value(tag="loss", simple_value=step / 10)]), step)
    path = next(tmp_path.iterdir())
    os.truncate(path, path.stat().st_size - 3)  # the driver died while writing step 3
    assert _scalars(tmp_path) == {"loss": {1: pytest.approx(0.1), 2: pytest.approx(0.2)}}
    events.close()


def _hparams(path: Path) -> dict:
    acc = EventAccumulator(str(path))
    acc.Reload()
    try:
        return acc.PluginTagToContent("hparams")
    except KeyError:
        return {}


@pytest.mark.parametrize("staged", [False, True])
def test_tensorboard_scalars_per_stage_and_one_hparams_experiment(tmp_path, staged):
    space = load_space("demo")
    study = tmp_path / "study"
    writer = TensorBoardWriter(space, Store(str(study)), str(tmp_path / "staging") if staged else None)
    writer.experiment()
    threads = threading.active_count()
    for progress, stage, round_ in ((10, "further_pretrain", 0), (20, "self_distill", 1),
                                    (30, "finetune", 0)):
        writer.scalars("t1", {"stage": stage, "round": round_, "step": 10, "progress": progress,
                              "loss": progress / 100, "val_accuracy": 0.5, "trial_done": False})
    writer.scalars("t1", {"stage": "finetune", "loss": 1.0})  # no trial-wide step: not a scalar
    writer.upload()  # a running trial's events so far reach the study folder, staged or not
    assert _scalars(study / "tensorboard" / "t1")["self_distill_r1/loss"] == {20: pytest.approx(0.2)}
    assert threading.active_count() == threads  # written by the caller: no thread per trial
    assert len(_open_files(tmp_path)) == 1  # the running trial's event file
    writer.hparams("t1", {"mask_ratio": 0.6, "self_distill.rounds": 1, "self_distill.mae_weight": 0.3},
                   {"val_accuracy": 0.8, "test_accuracy": 0.7, "progress": 40}, "completed")
    assert _open_files(tmp_path) == []  # closed when its trial ends, not with the study
    writer.close()
    scalars = _scalars(study / "tensorboard" / "t1")
    assert scalars["further_pretrain/loss"] == {10: pytest.approx(0.1)}
    assert scalars["self_distill_r1/loss"] == {20: pytest.approx(0.2)}
    assert scalars["finetune/val_accuracy"] == {30: pytest.approx(0.5)}
    assert scalars["final/val_accuracy"] == {40: pytest.approx(0.8)}
    experiment = metadata.parse_experiment_plugin_data(
        _hparams(study / "tensorboard")[metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == {p.key for p in space.params} | {"status"}
    assert "final/test_accuracy" in {m.name.tag for m in experiment.metric_infos}
    session = metadata.parse_session_start_info_plugin_data(
        _hparams(study / "tensorboard" / "t1")[metadata.SESSION_START_INFO_TAG])
    assert session.hparams["mask_ratio"].number_value == pytest.approx(0.6)
    assert session.hparams["status"].string_value == "completed"
