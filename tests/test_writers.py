"""The Ray-free results writers, driven directly and read back with pyarrow and TensorBoard."""
from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from raysd.spaces import load_space
from raysd.storage import Store
from raysd.study_folder import StudyFolder
from raysd.writers import ResultsWriter, TensorBoardWriter, history_row


def _rows(tid: str, steps, stage: str = "further_pretrain", attempt: int = 0) -> list[dict]:
    return [history_row(tid, {"stage": stage, "round": 0, "step": s, "progress": s, "attempt": attempt,
                              "loss": 1.0 / s, "node_ip": "ignored"}) for s in steps]


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _parts(study: Path) -> list[str]:
    folder = study / "results" / "history_parts"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_running_trials_rows_reach_its_history_parts_before_it_ends(tmp_path):
    writer = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2)):
        writer.add("t1", row)
    assert writer.flush()  # parts are due at every flush with part_seconds 0
    assert _parts(tmp_path) == ["t1-00000.parquet"]
    assert _read(tmp_path / "results" / "history_parts" / "t1-00000.parquet") == _rows("t1", (1, 2))
    for row in _rows("t1", (3,)):
        writer.add("t1", row)
    writer.flush()
    assert _parts(tmp_path) == ["t1-00000.parquet", "t1-00001.parquet"]
    assert not (tmp_path / "results" / "trials.parquet").exists()  # no trial has ended
    assert StudyFolder(str(tmp_path)).running_history() == {"t1": _rows("t1", (1, 2, 3))}


def test_parts_wait_for_their_period_and_close_writes_what_is_left(tmp_path):
    writer = ResultsWriter(str(tmp_path), part_seconds=3600)
    writer.add("t1", _rows("t1", (1,))[0])
    assert not writer.flush() and _parts(tmp_path) == []
    writer.close()  # the study stops (Ctrl-C) with t1 running: its rows wait for --resume
    assert _read(tmp_path / "results" / "history_parts" / "t1-00000.parquet") == _rows("t1", (1,))


def test_an_ended_trial_moves_its_rows_to_history_once_and_its_parts_go(tmp_path):
    writer = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2)):
        writer.add("t1", row)
    writer.flush()
    rerun = {**_rows("t1", (2,))[0], "loss": 9.0}  # written again after the part: the last wins
    for row in [rerun, *_rows("t1", (2,), attempt=1), *_rows("t2", (1,))]:
        writer.add(row["trial_id"], row)
    writer.end_trial({"trial_id": "t1", "status": "completed", "val_accuracy": 0.5})
    writer.flush()
    assert _read(tmp_path / "results" / "trials.parquet") == [
        {"trial_id": "t1", "status": "completed", "val_accuracy": 0.5}]
    history = _read(tmp_path / "results" / "history.parquet")
    assert [(r["step"], r["attempt"], r["loss"]) for r in history] == [(1, 0, 1.0), (2, 0, 9.0), (2, 1, 0.5)]
    assert _parts(tmp_path) == ["t2-00000.parquet"]  # t1's are folded in; t2 still runs


def test_a_new_writer_picks_up_a_crashed_drivers_parts(tmp_path):
    crashed = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2)):
        crashed.add("t1", row)
    crashed.end_trial({"trial_id": "t0", "status": "failed"})
    crashed.flush()
    Store(str(tmp_path)).write_rows(_rows("t0", (1,)), "results", "history_parts", "t0-00000.parquet")
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)  # drops t0's part: t0 has ended
    assert _parts(tmp_path) == ["t1-00000.parquet"]
    resumed.add("t1", _rows("t1", (3,))[0])
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert [r["trial_id"] for r in _read(tmp_path / "results" / "trials.parquet")] == ["t0", "t1"]
    assert [r["step"] for r in _read(tmp_path / "results" / "history.parquet")] == [1, 2, 3]
    assert _parts(tmp_path) == []


def test_a_failed_trial_run_again_by_resume_keeps_one_row_per_step(tmp_path):
    """--resume runs a failed trial again from its last checkpoint: the steps it repeats replace
    the failed run's rows, and its trials.parquet row is replaced."""
    first = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (1, 2, 3)):
        first.add("t1", row)
    first.end_trial({"trial_id": "t1", "status": "failed"})
    first.flush()
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    for row in _rows("t1", (3, 4)):  # from the checkpoint after step 2
        resumed.add("t1", {**row, "loss": 9.0})
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert _read(tmp_path / "results" / "trials.parquet") == [{"trial_id": "t1", "status": "completed"}]
    history = _read(tmp_path / "results" / "history.parquet")
    assert [(r["step"], r["loss"]) for r in history] == [(1, 1.0), (2, 0.5), (3, 9.0), (4, 9.0)]


def test_a_crashs_temporary_files_never_break_resume_or_drop_rows(tmp_path):
    """A driver killed inside Store.write_bytes leaves `<name>.tmp-<hex>` beside the file."""
    crashed = ResultsWriter(str(tmp_path), part_seconds=0)
    crashed.add("t1", _rows("t1", (1,))[0])
    crashed.end_trial({"trial_id": "t0", "status": "failed"})
    crashed.flush()
    results, parts = tmp_path / "results", tmp_path / "results" / "history_parts"
    for leftover in (parts / "t1-00001.parquet.tmp-0badc0de", results / "trials.parquet.tmp-1234abcd",
                     results / "history.parquet.tmp-5678ef90"):
        leftover.write_bytes(b"PAR1 cut short")
    assert [(r["trial_id"], r["step"]) for r in StudyFolder(str(tmp_path)).running_history()["t1"]] == [("t1", 1)]
    resumed = ResultsWriter(str(tmp_path), part_seconds=0)
    resumed.add("t1", _rows("t1", (2,))[0])
    resumed.flush()
    assert _parts(tmp_path) == ["t1-00000.parquet", "t1-00001.parquet"]
    resumed.end_trial({"trial_id": "t1", "status": "completed"})
    resumed.flush()
    assert [r["trial_id"] for r in _read(results / "trials.parquet")] == ["t0", "t1"]
    assert [r["step"] for r in _read(results / "history.parquet")] == [1, 2]
    assert not list(results.rglob("*.tmp-*"))  # nothing left behind


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
    writer.upload()  # a running trial's events reach the study folder when staged
    assert (study / "tensorboard" / "t1").is_dir()
    assert threading.active_count() == threads + 1  # the running trial's event writer
    writer.hparams("t1", {"mask_ratio": 0.6, "self_distill.rounds": 1, "self_distill.mae_weight": 0.3},
                   {"val_accuracy": 0.8, "test_accuracy": 0.7, "progress": 40}, "completed")
    assert threading.active_count() == threads  # closed when its trial ends, not with the study
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
