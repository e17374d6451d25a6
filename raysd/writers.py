"""Ray-free writers of a study folder's results; StudyRecorder (results.py) drives them from Tune.

ResultsWriter: trials.parquet and the history dataset (history.py; layout in study_folder.py).
TensorBoardWriter: per-trial scalars per stage and one HParams experiment. FileMirror: local
files kept in sync with copies in the study folder.
"""
from __future__ import annotations

import itertools
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pyarrow.fs as pafs
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from raysd.config import FAMILY_MODALITY, MODEL_FAMILIES
from raysd.credentials import redact_values
from raysd.data.base import METRICS
from raysd.history import SCALAR_KEYS, HistoryWriter, history_row
from raysd.spaces import Space
from raysd.storage import MODELS, TRIALS, Store
from raysd.study_folder import STATUSES, StudyFolder, best_row

__all__ = ["ResultsWriter", "TensorBoardWriter", "FileMirror", "history_row", "history_metrics",
           "staging_dir", "final_metric_names"]
PART_SECONDS = float(os.environ.get("RAYSD_HISTORY_PART_SECONDS", "30"))


class ResultsWriter:
    """A study's Parquet results: trials.parquet, replaced whole and atomically (Store) from the
    ended trials' rows it holds, and the history dataset, appended (HistoryWriter), so what a
    write costs is its new rows. `metrics`: the history's val_/test_ columns (history_metrics)."""

    def __init__(self, study_uri: str, part_seconds: float = PART_SECONDS, metrics: Sequence[str] = ()):
        folder = StudyFolder(study_uri)
        self.store = folder.store
        self.store.remove_temporaries("results")  # a crashed driver's cut-short writes
        # On --resume the file already holds the trials that ended before the crash.
        self.trials = folder.trial_rows()
        self.history = HistoryWriter(self.store, metrics, part_seconds)
        self._dirty = False  # trials changed since the last write
        self._written_at = 0.0  # when trials.parquet was last written (0: the first end writes)

    def add(self, trial_id: str, row: dict) -> None:
        """A running trial's history row, written with its next part."""
        self.history.add(trial_id, row)

    def end_trial(self, row: dict, *more: dict) -> None:
        """A trial's trials.parquet row(s) (a chain's: one per point), replacing those of an
        earlier run of the trial, for the next flush(); its last history rows are written now,
        before them."""
        tid = row["trial_id"]
        self.history.end_trial(tid)
        self.trials = [r for r in self.trials if r["trial_id"] != tid] + [row, *more]
        self._dirty = True

    def flush(self, force: bool = False) -> bool:
        """What is due: ended trials' rows and running trials' history rows, each at most every
        `part_seconds` (the first trial to end at once). trials.parquet is rewritten whole, so
        writing it at every end would cost O(trials) per trial (O(n^2) per study: at 1,000
        trials the driver's largest cost of its own, benchmarks/driver_scale.py). True when
        history parts were due."""
        if self._dirty and (force or time.time() - self._written_at >= self.history.part_seconds):
            self.store.write_rows(self.trials, "results", TRIALS)
            self._dirty, self._written_at = False, time.time()
        if not self.history.due():
            return False
        self.history.write_parts()
        return True

    def close(self) -> None:
        """Write everything: trials still running (Ctrl-C) keep their rows for --resume."""
        self.flush(force=True)
        self.history.write_parts(hold_last=False)

    def keep_best_model(self, metric: str, mode: str) -> None:
        """study.keep_models: best - of the ended trials, only the best one's model stays."""
        best = best_row(self.trials, metric, mode)
        if best is None:
            return
        ended = {r["trial_id"] for r in self.trials}  # a running trial's model stays
        for name in self.store.list(MODELS):
            if name in ended and name != best["trial_id"]:
                self.store.delete_dir(MODELS, name)


class TensorBoardWriter:
    """Per-trial event files under <study>/tensorboard/<trial id>/ and the study's HParams
    experiment in its root run. With remote storage they are written to `staging` (TensorBoard
    writers need a local path) and uploaded."""

    def __init__(self, space: Space, store: Store, staging: str | None):
        self.space, self.store, self.staging = space, store, staging
        self.root = Path(staging) if staging else Path(store.path("tensorboard"))
        self._writers: dict[str, EventFile] = {}  # trial id -> its event file
        self._unsent: set[str] = set()  # trials with events not yet uploaded

    def experiment(self) -> None:
        """One HParams experiment for the whole study, in TensorBoard's root run: every searched
        parameter and every final metric is a column, whichever trial TensorBoard reads first."""
        from tensorboard.plugins.hparams import summary_v2 as hp

        if any(n.startswith("events.out") for n in self.store.list("tensorboard")):
            return  # --resume: the experiment is there
        columns = [hp.HParam(p.key, _domain(p)) for p in self.space.params]
        columns += [hp.HParam("variant"), hp.HParam("method"), hp.HParam("seed")] if not self.space.params else []
        columns.append(hp.HParam("status", hp.Discrete(list(STATUSES))))
        metrics = [hp.Metric(f"final/{name}") for name in final_metric_names(self.space)]
        writer = EventFile(self.root)
        writer.add_summary(hp.hparams_config_pb(columns, metrics))
        writer.close()
        if self.staging:
            self.store.upload(self.root, "tensorboard")

    def _writer(self, tid: str):
        if tid not in self._writers:
            self._writers[tid] = EventFile(self.root / tid, flush_secs=10)
        return self._writers[tid]

    def scalars(self, tid: str, result: dict) -> None:
        """A reported row's losses, rates and val_ metrics at its trial-wide step `progress`,
        tagged by stage (self_distill_r<round> per round)."""
        if "progress" not in result:
            return
        stage = result.get("stage", "trial")
        tag = f"{stage}_r{result['round']}" if stage == "self_distill" else stage
        keys = [k for k in SCALAR_KEYS if k in result]
        if not result.get("trial_done"):
            keys += [k for k in result if k.startswith("val_")]
        # One event per row, not one per scalar: a third of the driver's cost per result
        # (benchmarks/driver_scale.py); TensorBoard reads each value as its own scalar.
        values = [Summary.Value(tag=f"{tag}/{k}", simple_value=float(result[k])) for k in keys]
        self._writer(tid).add_summary(Summary(value=values), result["progress"])
        self._unsent.add(tid)

    def hparams(self, tid: str, config: dict, last: dict, status: str) -> None:
        """The trial's session in the study's HParams experiment, and its final metrics; then
        its writer is closed (a study of many trials would otherwise keep a writer thread per
        trial until it ends)."""
        from tensorboard.plugins.hparams import summary_v2 as hp

        writer = self._writer(tid)
        params = {p.key: config[p.key] for p in self.space.params if config.get(p.key) is not None}
        if config.get("variant"):
            values = config["variant"]["values"]
            params.update(variant=config["variant"]["variant"], method=values.get("method", ""),
                          seed=values.get("seed", 0))
        params["status"] = status
        writer.add_summary(hp.hparams_pb(redact_values(params), trial_id=tid))
        for key in final_metric_names(self.space):
            value = last.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_summary(Summary(value=[Summary.Value(tag=f"final/{key}", simple_value=float(value))]),
                                   int(last.get("progress", 0)))
        self._writers.pop(tid).close()
        self._unsent.discard(tid)
        if self.staging:
            self.store.upload(self.root / tid, "tensorboard", tid)

    def end_run(self, tid: str) -> None:
        """A chain's own run (its scalars; its points are runs below it) is complete."""
        writer = self._writers.pop(tid, None)
        if writer is not None:
            writer.close()
        self._unsent.discard(tid)
        if self.staging and (self.root / tid).exists():
            self.store.upload(self.root / tid, "tensorboard", tid)

    def upload(self) -> None:
        """The running trials' events so far, flushed (and uploaded, with remote storage), so
        TensorBoard follows a study while it runs, also a trial that has gone quiet."""
        for tid in self._unsent & set(self._writers):
            self._writers[tid].flush()
            if self.staging:
                self.store.upload(self.root / tid, "tensorboard", tid)
        self._unsent.clear()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


class EventFile:
    """One TensorBoard event file: summaries by step, each a record in TensorBoard's own format
    (its RecordWriter), written by the caller's thread into a buffered file, flushed by the
    first summary `flush_secs` after the last flush, by flush() and by close(). TensorBoard's
    EventFileWriter starts a writer thread per file instead; with eight trials' files open,
    handing events to those threads cost the driver 0.12 ms of CPU per event, against 0.03 ms
    written here. A driver that dies mid-record leaves the files readable up to their last
    whole record (tests/test_writers.py)."""

    _numbers = itertools.count()  # as EventFileWriter's: two files of one second differ

    def __init__(self, logdir: Path, flush_secs: int = 120):
        logdir.mkdir(parents=True, exist_ok=True)
        # The name TensorBoard's writers give: the reader orders a run's files by it.
        name = "events.out.tfevents.%010d.%s.%s.%s" % (time.time(), socket.gethostname(), os.getpid(),
                                                       next(self._numbers))
        self._file = open(logdir / name, "wb")  # noqa: SIM115 - closed by close()
        self._records = RecordWriter(self._file)
        self._flush_secs = flush_secs
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_summary(self, summary: Summary, step: int | None = None) -> None:
        event = Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = int(step)
        self._add(event)
        if time.monotonic() - self._flushed_at >= self._flush_secs:
            self.flush()

    def _add(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self._file.close()


def staging_dir(study_uri: str) -> str | None:
    """A new local TensorBoard folder for remote storage (TensorBoard writers need a local
    path); its owner removes it (StudyRecorder, at the experiment's end)."""
    if isinstance(pafs.FileSystem.from_uri(study_uri)[0], pafs.LocalFileSystem):
        return None
    return tempfile.mkdtemp(prefix="raysd-tb-")


class FileMirror:
    """Local files (local path -> name in the study folder) uploaded whenever they changed."""

    def __init__(self, store: Store, mirrors: dict[str, str]):
        self.store, self.mirrors = store, mirrors
        self._mirrored: dict[str, tuple] = {}  # local file -> (size, mtime in ns) last uploaded

    def sync(self) -> None:
        for local, name in self.mirrors.items():
            path = Path(local)
            if not path.exists():
                continue
            # The size too: mtime moves in clock ticks (ms), and an appended record can land in
            # the same tick as the last upload.
            seen = (path.stat().st_size, path.stat().st_mtime_ns)
            if seen != self._mirrored.get(local):
                self.store.write_bytes(path.read_bytes(), name)
                self._mirrored[local] = seen


def history_metrics(space: Space) -> list[str]:
    """The history's metric columns: what fine-tuning validates and the final val_/test_ ones."""
    return [n for n in final_metric_names(space) if n.startswith(("val_", "test_"))]


def final_metric_names(space: Space) -> list[str]:
    """What a finished trial reports: the task's metrics and loss on val and test, then the
    paper's Figure 5 quantities."""
    modality = FAMILY_MODALITY.get(MODEL_FAMILIES.get(space.doc["model"]))
    names = METRICS.get(modality, ())
    names = dict.fromkeys([space.study.metric.split("_", 1)[1], *names, "loss"])
    return [f"{split}_{n}" for split in ("val", "test") for n in names] + ["gen_gap", "init_distance"]


def _domain(param):
    from tensorboard.plugins.hparams import summary_v2 as hp

    if param.type == "choice":
        return hp.Discrete(list(param.choices))
    if param.type == "int":
        return hp.IntInterval(int(param.low), int(param.high))
    return hp.RealInterval(float(param.low), float(param.high))
