"""Recording a running study: StudyRecorder, a Tune callback over the Ray-free writers
(writers.py), and trial_row, what a trial leaves in trials.parquet."""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

import raysd
from raysd.chain import ROUNDS, points as chain_points
from raysd.config import columns
from raysd.credentials import redact, redact_values
from raysd.resume import TRIAL_ID
from raysd.spaces import Space
from raysd.storage import FATAL_PREFIX, TRAIN
from raysd.writers import (FileMirror, ResultsWriter, TensorBoardWriter, history_metrics, history_row,
                           staging_dir)

# Per-stage columns: cost, artifact key, whether it was reused, and its early signal.
FINAL_PREFIXES = ("val_", "test_", "train_", "seconds_", "steps_", "key_", "reused_", "knn_accuracy_")
FINAL_KEYS = ("gen_gap", "init_distance", "restarts", "resumed_from", "worker_nodes", "num_nodes",
              "trained_seconds")


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def trial_row(space: Space, trial_id: str, config: dict, last: dict, status: str,
              error: str | None, wall_seconds: float) -> dict:
    """One row of trials.parquet: params, resolved settings, final metrics, cost, provenance."""
    values = {p.key: config.get(p.key) for p in space.params}
    active = space.active({k: v for k, v in values.items() if v is not None})  # at this row's T'
    values = {k: active.get(k) for k in values}
    variant = config.get("variant")  # raysd compare: a fixed variant, not a searched point
    if variant:
        values.update(variant["values"])
    cfg = space.trial_config({k: v for k, v in values.items() if v is not None})
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "error": error,
                           "smoke": space.study.smoke}
    if variant:
        row.update(variant=variant["variant"], method=cfg.method, seed=cfg.seed)
    row.update({f"param.{k}": _clean(v) for k, v in values.items()})
    row.update(columns(cfg))
    row.update({k: v for k, v in last.items()
                if k.startswith(FINAL_PREFIXES) or k in FINAL_KEYS})
    row["wall_seconds"] = wall_seconds
    row["raysd_version"] = raysd.__version__
    return redact_values(row)


def point_rows(space: Space, trial_id: str, config: dict, last: dict, status: str,
               error: str | None, wall_seconds: float) -> list[dict]:
    """A chain's rows of trials.parquet: one per point it reached, as the row of a trial of that
    T' (its params, settings, metrics, the cost of its stages), `best_point` marking the chain's
    best and `chain_status` how the chain ended; a chain that failed adds a failed row at the
    point it did not reach (so --resume runs it again). Chain-wide columns: wall_seconds,
    trained_seconds, restarts, worker_nodes."""
    reached = chain_points(last)
    rows = []
    for t, metrics in reached.items():
        kept = {k: v for k, v in last.items() if k.startswith(FINAL_PREFIXES[3:]) or k in FINAL_KEYS}
        kept = {_as_point(k, t): v for k, v in kept.items() if _as_point(k, t)}
        kept.update(metrics)
        row = trial_row(space, trial_id, {**config, ROUNDS: t}, kept, "completed", None, wall_seconds)
        rows.append({**row, "best_point": t == last.get("best_rounds"), "chain_status": status})
    if status == "failed" or not rows:
        todo = [t for t in space.chain.points if t not in reached]
        t = todo[0] if todo else max(reached)
        row = trial_row(space, trial_id, {**config, ROUNDS: t}, {}, status, error, wall_seconds)
        rows.append({**row, "best_point": False, "chain_status": status})
    return rows


def _as_point(key: str, t: int) -> str | None:
    """A chain's per-stage column as the point T' = t has it (None: a stage after it)."""
    prefix = next(p for p in FINAL_PREFIXES[3:] + ("",) if key.startswith(p))
    stage = key[len(prefix):]
    if prefix and stage.startswith("finetune_"):
        return f"{prefix}finetune" if stage == f"finetune_{t}" else None
    if prefix and stage.startswith("self_distill_") and int(stage.rsplit("_", 1)[1]) > t:
        return None
    return key


def _guarded(method):
    """A recorder error is one line on stderr and never ends the study (Tune would abort it)."""

    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the study matters more than one write
            line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"raysd: could not record results ({method.__name__}): "
                  f"{type(err).__name__}: {redact(line)}", file=sys.stderr, flush=True)
    call.__name__ = method.__name__
    return call


class StudyRecorder(Callback):
    """Tune's events to the study's writers (writers.py): every reported row to history, one
    row per ended trial to trials.parquet, TensorBoard, and the mirrored files. It also
    deletes what an ended trial leaves that nothing reads (final_trial says when)."""

    def __init__(self, space: Space, study_uri: str, mirrors: dict[str, str] | None = None):
        self.space, self.study_uri = space, study_uri
        self.mirrors = mirrors or {}  # local file -> its name in the study folder, kept in sync
        self._started: dict[str, float] = {}

    def setup(self, **info) -> None:
        # Made here, when the study starts: a resumed study gets its own, removed at its end.
        self.staging = staging_dir(self.study_uri)  # local TensorBoard folder when storage is remote
        self.results = ResultsWriter(self.study_uri, metrics=history_metrics(self.space))
        self.tensorboard = TensorBoardWriter(self.space, self.results.store, self.staging)
        self.mirror = FileMirror(self.results.store, self.mirrors)
        self._final: set[str] = set()  # trials whose train/ folder is deleted, maybe not yet all
        self.tensorboard.experiment()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started.setdefault(trial.config[TRIAL_ID], time.time())

    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tid = trial.config[TRIAL_ID]
        # A chain's last report repeats its last point's row (the same stage, round and step)
        # with the best point's metrics: the point's own row stays in the history.
        if not (self.space.chain is not None and result.get("trial_done")):
            self.results.add(tid, history_row(tid, result))
        self.tensorboard.scalars(tid, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        status = "completed" if last.get("trial_done") else "stopped"  # stopped: ended early by ASHA
        self._finish(trial, status, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "failed", error_line(trial))

    @_guarded
    def _finish(self, trial, status: str, error: str | None) -> None:
        tid, last = trial.config[TRIAL_ID], trial.last_result or {}
        wall = time.time() - self._started.get(tid, time.time())
        if self.space.chain is None:
            rows = [trial_row(self.space, tid, trial.config, last, status, error, wall)]
            self.tensorboard.hparams(tid, trial.config, last, status)
        else:  # every point a session of its own, beside the chain's scalars
            rows = point_rows(self.space, tid, trial.config, last, status, error, wall)
            for row in rows:
                t = row[f"cfg.{ROUNDS}"]
                self.tensorboard.hparams(f"{tid}/rounds_{t}", self.space.active({**trial.config, ROUNDS: t}),
                                         chain_points(last).get(t, {}), row["status"])
            self.tensorboard.end_run(tid)
        row = rows[0]
        self.results.end_trial(*rows)
        if status == "completed" and self.space.study.keep_models == "best":
            self.results.keep_best_model(self.space.study.metric, self.space.study.mode)
        if not row["cfg.logging.keep_checkpoints"] and final_trial(self.results.store, tid, status):
            self._final.add(tid)
            try:
                self._delete_train_folder(tid)
            except OSError:
                pass  # a stopped trial's workers still writing a checkpoint: the sweep at the end

    def _delete_train_folder(self, tid: str) -> None:
        if self.results.store.exists(TRAIN, tid):
            self.results.store.delete_dir(TRAIN, tid)

    @_guarded
    def on_step_end(self, iteration, trials, **info) -> None:
        # A trial in trials.parquet has finished for `--resume`, which never runs it again.
        if self.results.flush():  # running trials' parts were due: so are their uploads
            self.tensorboard.upload()
            self.mirror.sync()

    @_guarded
    def on_experiment_end(self, trials, **info) -> None:
        try:
            self.results.close()  # trials still running (Ctrl-C): their rows wait for --resume
            self.tensorboard.upload()
            self.mirror.sync()
            self.tensorboard.close()
            for tid in self._final:  # what stopping trials wrote after they were recorded
                self._delete_train_folder(tid)
        finally:
            if self.staging:  # everything in it is uploaded, or lost with the study's end
                shutil.rmtree(self.staging, ignore_errors=True)

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its state (raysd never loads it)
        state = self.__dict__.copy()
        for key in ("results", "tensorboard", "mirror", "staging", "_final"):  # writers, threads
            state.pop(key, None)
        return state


def final_trial(store, trial_id: str, status: str) -> bool:
    """Whether nothing will resume this ended trial from its Ray Train checkpoints, so its
    train/<trial id>/ folder may go (unless logging.keep_checkpoints): it completed; or ASHA
    stopped it (Tune never runs either again, nor does --resume); or it failed with an error a
    rank left (<FATAL_PREFIX><rank>.txt: a retry would meet it again, mostly before its first
    checkpoint). A trial that failed otherwise (Ray Train's restarts spent on crashes) keeps its
    folder: `--resume` retries it from its last checkpoint, and its error line points at the
    worker_error.txt there."""
    if status != "failed":
        return True
    return any(name.startswith(FATAL_PREFIX) for name in store.list(TRAIN, trial_id))


def error_line(trial) -> str:
    """The root cause of a failed trial as one line (the last line of Tune's error file)."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return redact(lines[-1]) if lines else "failed (no error message)"
