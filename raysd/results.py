"""Study results: trials.parquet, history.parquet and TensorBoard, written by a Tune callback.

Files live under <storage>/<study>/ on any pyarrow filesystem (local, NFS, s3://, gs://).
Each write replaces a whole file atomically, so readers never see a truncated file.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

import raysd
from raysd.config import columns
from raysd.spaces import Space
from raysd.storage import HISTORY, MODELS, PARTS, TRIALS, Store

# Our own keys in a reported row; Tune's bookkeeping keys (dates, pids, iterations) are dropped.
# `attempt` counts the trial's worker-group restarts: a step rerun after one is a new row.
ROW_KEYS = ("stage", "round", "step", "progress", "attempt", "loss", "mae_loss", "distill_loss",
            "ce_loss", "lr", "samples_per_s", "knn_accuracy")
SCALAR_KEYS = ROW_KEYS[5:]
ROW_IDENTITY = ("stage", "round", "step", "attempt")
PART_SECONDS = float(os.environ.get("RAYSD_HISTORY_PART_SECONDS", "30"))
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
    return row


def _guarded(method):
    """A recorder error is one line on stderr and never ends the study (Tune would abort it)."""

    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the study matters more than one write
            print(f"raysd: could not record results ({method.__name__}): "
                  f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                  file=sys.stderr, flush=True)
    call.__name__ = method.__name__
    return call


class StudyRecorder(Callback):
    """Every reported row to history, one row per finished trial, and TensorBoard.

    Rows of running trials go to history_parts/ every PART_SECONDS, so a driver crash loses at
    most that much; a trial's parts are folded into history.parquet when it ends."""

    def __init__(self, space: Space, study_uri: str, tensorboard_staging: str | None,
                 mirrors: dict[str, str] | None = None):
        self.space, self.study_uri = space, study_uri
        self.staging = tensorboard_staging  # local folder mirrored to storage when remote
        self.mirrors = mirrors or {}  # local file -> its name in the study folder, kept in sync
        self._mirrored: dict[str, float] = {}  # local file -> mtime last uploaded
        self._unsent: set[str] = set()  # trials with TensorBoard events not yet uploaded
        self._writers: dict[str, Any] = {}
        self._pending: dict[str, list[dict]] = {}  # rows not yet in a part
        self._parted: dict[str, list[dict]] = {}  # rows already in parts, per running trial
        self._started: dict[str, float] = {}

    def setup(self, **info) -> None:
        self.store = Store(self.study_uri)
        # On --resume the files already hold the trials that finished before the crash,
        # and the parts hold the rows of those that were running.
        self.trials = self.store.read_rows("results", TRIALS)
        self.history = self.store.read_rows("results", HISTORY)
        finished = {row["trial_id"] for row in self.trials}
        self._parted, self._parts = {}, {}
        for name in self.store.list("results", PARTS):
            tid = name.rsplit("-", 1)[0]
            self._parts.setdefault(tid, []).append(name)
            if tid not in finished:
                self._parted.setdefault(tid, []).extend(self.store.read_rows("results", PARTS, name))
        self.tb_root = Path(self.staging) if self.staging else Path(self.store.path("tensorboard"))
        self._dirty = False  # rows changed since the last write
        self._parted_at = time.time()
        self._drop_parts(finished)  # left by a crash between a trial's write and its clean-up
        self._experiment()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started.setdefault(trial.trial_id, time.time())

    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = {"trial_id": trial.trial_id, **{k: result[k] for k in ROW_KEYS if k in result}}
        row.update({k: result[k] for k in result if k.startswith(("val_", "test_"))})
        self._pending.setdefault(trial.trial_id, []).append(row)
        self._scalars(trial.trial_id, result)
        self._unsent.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        status = "completed" if last.get("trial_done") else "stopped"  # stopped: ended early by ASHA
        self._finish(trial, status, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "failed", error_line(trial))

    @_guarded
    def _finish(self, trial, status: str, error: str | None) -> None:
        tid = trial.trial_id
        wall = time.time() - self._started.get(tid, time.time())
        self.trials = [r for r in self.trials if r["trial_id"] != tid]
        self.trials.append(trial_row(self.space, tid, trial.config, trial.last_result or {},
                                     status, error, wall))
        rows = self._parted.pop(tid, []) + self._pending.pop(tid, [])
        unique = {tuple(row.get(k) for k in ROW_IDENTITY): row for row in rows}  # last one wins
        self.history += list(unique.values())
        self._dirty = True
        self._hparams(tid, trial.config, trial.last_result or {}, status)
        if status == "completed" and self.space.study.keep_models == "best":
            self._keep_best_model()

    @_guarded
    def on_step_end(self, iteration, trials, **info) -> None:
        # Tune saves its experiment state just before this hook: a trial that appears in
        # trials.parquet is then also finished for `--resume`, which never reruns it.
        if self._dirty:
            self.store.write_rows(self.history, "results", HISTORY)
            self.store.write_rows(self.trials, "results", TRIALS)
            self._dirty = False
            self._drop_parts({row["trial_id"] for row in self.trials})
        if time.time() - self._parted_at >= PART_SECONDS:
            self._write_parts()
            self._upload()

    def _write_parts(self) -> None:
        for tid, rows in list(self._pending.items()):
            if rows:
                name = f"{tid}-{len(self._parts.get(tid, [])):05d}.parquet"
                self.store.write_rows(rows, "results", PARTS, name)
                self._parts.setdefault(tid, []).append(name)
                self._parted.setdefault(tid, []).extend(rows)
                self._pending[tid] = []
        self._parted_at = time.time()

    def _drop_parts(self, finished: set[str]) -> None:
        for tid in finished & set(self._parts):
            for name in self._parts.pop(tid):
                self.store.delete("results", PARTS, name)

    def _upload(self) -> None:
        """Remote storage: running trials' TensorBoard events and the mirrored files, every
        PART_SECONDS, so TensorBoard on s3:// follows a study while it runs."""
        if self.staging:
            for tid in self._unsent & set(self._writers):
                self._writers[tid].flush()
                self.store.upload(self.tb_root / tid, "tensorboard", tid)
            self._unsent.clear()
        for local, name in self.mirrors.items():
            path = Path(local)
            mtime = path.stat().st_mtime if path.exists() else None
            if mtime is not None and mtime != self._mirrored.get(local):
                self.store.write_bytes(path.read_bytes(), name)
                self._mirrored[local] = mtime

    def _keep_best_model(self) -> None:
        """study.keep_models: best - only the best finished trial's fine-tuned model stays."""
        metric, sign = self.space.study.metric, 1 if self.space.study.mode == "max" else -1
        done = [r for r in self.trials if r["status"] == "completed" and r.get(metric) is not None]
        if not done:
            return
        best = max(done, key=lambda r: sign * r[metric])["trial_id"]
        finished = {r["trial_id"] for r in self.trials}  # a running trial's model stays
        for name in self.store.list(MODELS):
            if name in finished and name != best:
                self.store.delete_dir(MODELS, name)

    def _experiment(self) -> None:
        """One HParams experiment for the whole study, in TensorBoard's root run: every searched
        parameter and every final metric is a column, whichever trial TensorBoard reads first."""
        from tensorboard.plugins.hparams import summary_v2 as hp
        from torch.utils.tensorboard import SummaryWriter

        if any(n.startswith("events.out") for n in self.store.list("tensorboard")):
            return  # --resume: the experiment is there
        columns = [hp.HParam(p.key, _domain(p)) for p in self.space.params]
        columns += [hp.HParam("variant"), hp.HParam("method"), hp.HParam("seed")] if not self.space.params else []
        columns.append(hp.HParam("status", hp.Discrete(["completed", "stopped", "failed"])))
        metrics = [hp.Metric(f"final/{name}") for name in final_metric_names(self.space)]
        writer = SummaryWriter(str(self.tb_root))
        writer.file_writer.add_summary(hp.hparams_config_pb(columns, metrics))
        writer.close()
        if self.staging:
            self.store.upload(self.tb_root, "tensorboard")

    def _writer(self, tid: str):
        if tid not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[tid] = SummaryWriter(str(self.tb_root / tid), flush_secs=10)
        return self._writers[tid]

    def _scalars(self, tid: str, result: dict) -> None:
        if "progress" not in result:
            return
        stage = result.get("stage", "trial")
        tag = f"{stage}_r{result['round']}" if stage == "self_distill" else stage
        writer = self._writer(tid)
        for key in SCALAR_KEYS:
            if key in result:
                writer.add_scalar(f"{tag}/{key}", result[key], result["progress"])
        for key in result:
            if key.startswith("val_") and not result.get("trial_done"):
                writer.add_scalar(f"{tag}/{key}", result[key], result["progress"])

    def _hparams(self, tid: str, config: dict, last: dict, status: str) -> None:
        """The trial's session in the study's HParams experiment, and its final metrics."""
        from tensorboard.plugins.hparams import summary_v2 as hp

        writer = self._writer(tid)
        params = {p.key: config[p.key] for p in self.space.params if config.get(p.key) is not None}
        if config.get("variant"):
            values = config["variant"]["values"]
            params.update(variant=config["variant"]["variant"], method=values.get("method", ""),
                          seed=values.get("seed", 0))
        params["status"] = status
        writer.file_writer.add_summary(hp.hparams_pb(params, trial_id=tid))
        for key in final_metric_names(self.space):
            value = last.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"final/{key}", float(value), int(last.get("progress", 0)))
        writer.flush()
        self._unsent.discard(tid)
        if self.staging:
            self.store.upload(self.tb_root / tid, "tensorboard", tid)

    @_guarded
    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_end(0, trials)
        self._write_parts()  # trials still running (Ctrl-C): their rows wait for --resume
        for writer in self._writers.values():
            writer.close()

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        state = self.__dict__.copy()
        for key in ("store", "trials", "history", "_writers", "_parted", "_parts", "_pending"):
            state.pop(key, None)
        state.update(_writers={}, _pending={}, _parted={})
        return state


def final_metric_names(space: Space) -> list[str]:
    """What a finished trial reports: the task's metrics and loss on val and test, then the
    paper's Figure 5 quantities."""
    from raysd import models
    from raysd.data import images, text

    task_metrics = {"vit": images.METRICS, "roberta": text.METRICS}  # the data modules' own
    names = task_metrics.get(models.family(space.doc["model"]), ())
    names = dict.fromkeys([space.study.metric.split("_", 1)[1], *names, "loss"])
    return [f"{split}_{n}" for split in ("val", "test") for n in names] + ["gen_gap", "init_distance"]


def _domain(param):
    from tensorboard.plugins.hparams import summary_v2 as hp

    if param.type == "choice":
        return hp.Discrete(list(param.choices))
    if param.type == "int":
        return hp.IntInterval(int(param.low), int(param.high))
    return hp.RealInterval(float(param.low), float(param.high))


def error_line(trial) -> str:
    """The root cause of a failed trial as one line (the last line of Tune's error file)."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no error message)"


def staging_dir(study_uri: str) -> str | None:
    """Local TensorBoard folder for remote storage (TensorBoard writers need a local path)."""
    if isinstance(pafs.FileSystem.from_uri(study_uri)[0], pafs.LocalFileSystem):
        return None
    return tempfile.mkdtemp(prefix="raysd-tb-")
