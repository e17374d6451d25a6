"""A Tune trial's driver: build the trial's TrialConfig and run it as one Ray Train job.

This process and the TrainController it starts only wait on the ranks, so neither imports
torch, transformers or raysd's model code (raysd.ddp keeps torch on the ranks): a trial's
non-training processes cost what Ray itself costs. The fatal-error files the ranks leave
(raysd.train) are read and written here."""
from __future__ import annotations

import logging
import os
import time

import pyarrow.fs as pafs
import ray.train
from ray import tune
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from raysd.config import PLACEMENTS
from raysd.ddp import DDP, train_loop
from raysd.spaces import Space
from raysd.storage import FATAL_PREFIX, SPACE_FILE, TRIAL_ID

logger = logging.getLogger(__name__)

WORKER_ERROR = "worker_error.txt"  # a failed trial's worker traceback, in its train folder
# A failed trial's error line, under the Tune trial that met it: when Tune starts that trial
# again (its driver's node was lost, study.py) the error is raised again before any training.
FAILED = "trial_failed.txt"


class TrialFailed(RuntimeError):
    """A trial's training failed; the message is its root cause on one line."""


def trial_driver(config: dict, space: Space, train_storage: str, artifacts: str | None,
                 models: str | None, janitor=None) -> None:
    """A Tune trial: build this trial's TrialConfig and run it as one data-parallel Train job.
    `janitor`: the study's PlacementGroupJanitor (janitor.py); without one, Ray Train starts its
    own cleaner actor for the trial."""
    values = {p.key: config[p.key] for p in space.params if p.key in config}
    if "variant" in config:  # raysd compare
        values.update(config["variant"]["values"])
    cfg = space.trial_config(values)
    # A worker group that cannot start in time is retried without limit (Ray's default
    # controller_failure_limit): on an autoscaling cluster the nodes are still coming.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # No PreemptionWatcher actor per trial (~240 MB): it lets ranks that read Ray's preemption
    # notice checkpoint before their node drains, which raysd's ranks do not (they checkpoint
    # every logging.checkpoint_every steps). A preempted node's lost workers are still retried
    # from the last checkpoint and, recognised as preempted, not counted in max_failures.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    name = config[TRIAL_ID]  # raysd's id (resume.py), the same when --resume runs it again
    run_uri = f"{train_storage}/{name}"
    fs, run_dir = pafs.FileSystem.from_uri(run_uri)
    fs.create_dir(run_dir, recursive=True)
    attempt = tune.get_context().get_trial_id()  # the same when Tune retries this trial
    failed = _read(fs, f"{run_dir}/{FAILED}")
    if failed and failed.partition("\n")[0] == attempt:
        raise TrialFailed(failed.partition("\n")[2])
    for rank in fatal_errors(run_uri):  # from an earlier run of this trial that --resume retries
        fs.delete_file(f"{run_dir}/{FATAL_PREFIX}{rank}.txt")
    try:
        _train(cfg, space, name, run_uri, train_storage, artifacts, models, janitor)
    except TrialFailed as err:
        with fs.open_output_stream(f"{run_dir}/{FAILED}") as f:
            f.write(f"{attempt}\n{err}".encode())
        raise
    _let_tune_take_the_last_report()


def _train(cfg, space: Space, name: str, run_uri: str, train_storage: str, artifacts: str | None,
           models: str | None, janitor) -> None:
    """The trial as one Ray Train run; TrialFailed with its root cause when it fails."""
    fs, run_dir = pafs.FileSystem.from_uri(run_uri)
    trainer = _Trainer(
        train_loop, backend_config=DDP(),
        train_loop_config={"trial": cfg, "study_marker": study_marker(train_storage),
                           "run_uri": run_uri, "artifacts": artifacts, "chain": space.chain,
                           "model_uri": f"{models}/{name}" if models else None},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.workers, use_gpu=cfg.resources.use_gpu,
            resources_per_worker=cfg.worker_resources(), accelerator_type=cfg.resources.accelerator_type,
            placement_strategy=PLACEMENTS[cfg.resources.placement]),
        # Named after the trial: a retried or resumed trial finds its own checkpoints.
        run_config=ray.train.RunConfig(
            name=name, storage_path=train_storage, callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=space.study.max_failures),
        ),
        janitor=janitor,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        _raise_fatal(run_uri)  # a rank's own message beats the group's (its peers' are collateral)
        # The error line says where the workers' whole traceback is: Ray's own logs stay hidden.
        log = f"{run_dir}/{WORKER_ERROR}"
        with fs.open_output_stream(log) as f:
            f.write(str(err).encode())
        raise TrialFailed(f"{_root_cause(err)} (traceback: {run_uri}/{WORKER_ERROR})") from None
    _raise_fatal(run_uri)  # the recorder (results.py) deletes the checkpoints of a final trial


class _Trainer(DataParallelTrainer):
    """Ray Train's DataParallelTrainer without two of its callbacks, each an actor per trial
    (`_create_default_callbacks` is Ray 2.60's private hook):
    - Ray Data's: raysd's ranks load their own data, and it starts a DatasetManager (~240 MB)
      even when the trainer is given no datasets;
    - the PlacementGroupCleaner's, on the head (~200 MB), when the study's janitor (janitor.py)
      guards the trial's placement groups instead."""

    def __init__(self, *args, janitor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._janitor = janitor

    def _create_default_callbacks(self):
        callbacks = []
        for callback in super()._create_default_callbacks():
            if isinstance(callback, PlacementGroupCleanerCallback) and self._janitor:
                callback = _PlacementGroupGuard(self._janitor)  # in its place: as early after a start
            if not isinstance(callback, DatasetsCallback):
                callbacks.append(callback)
        return callbacks


class _PlacementGroupGuard(ControllerCallback, WorkerGroupCallback):
    """In the trial's Ray Train controller: registers each worker group's placement group with
    the study's janitor, and tells it when the controller ends of its own accord."""

    def __init__(self, janitor):
        self._janitor = janitor
        self._controller_id = None

    def after_controller_start(self, train_run_context) -> None:
        self._controller_id = ray.get_runtime_context().get_actor_id()

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        me = ray.get_runtime_context().current_actor
        try:
            ray.get(self._janitor.guard.remote(self._controller_id, me, group), timeout=60)
        except Exception as err:  # noqa: BLE001 - the trial runs on; only a crash would leak
            logger.warning("raysd: the study's placement group janitor did not answer (%s); if this "
                           "trial's controller dies, its workers' resources stay reserved until the "
                           "study ends", err)

    async def before_controller_shutdown(self) -> None:
        self._release()

    def before_controller_abort(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._controller_id:
            self._janitor.release.remote(self._controller_id)


def _read(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def study_marker(train_storage: str) -> str | None:
    """The study's space file, which every worker must see when storage is a local path."""
    return None if "://" in train_storage else f"{train_storage.rsplit('/', 1)[0]}/{SPACE_FILE}"


def write_fatal(run_uri: str, rank: int, err: Exception) -> None:
    """Leave a rank's error that a retry would only repeat, as one line, for trial_driver."""
    line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    fs, path = pafs.FileSystem.from_uri(f"{run_uri}/{FATAL_PREFIX}{rank}.txt")
    with fs.open_output_stream(path) as f:
        f.write(f"{type(err).__name__}: {line}".encode())


def fatal_errors(run_uri: str) -> dict[int, str]:
    """rank -> the fatal error it left in the trial's train folder ({} when none did)."""
    fs, run_dir = pafs.FileSystem.from_uri(run_uri)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        name = info.base_name
        if name.startswith(FATAL_PREFIX) and name.endswith(".txt"):
            with fs.open_input_stream(info.path) as f:
                found[int(name[len(FATAL_PREFIX):-len(".txt")])] = f.read().decode()
    return dict(sorted(found.items()))


def _raise_fatal(run_uri: str) -> None:
    """TrialFailed with the fatal error of the lowest rank that left one, naming that rank."""
    errors = fatal_errors(run_uri)
    if errors:
        rank, message = next(iter(errors.items()))
        name, _, line = message.partition(": ")
        more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
        raise TrialFailed(f"{name} on rank {rank}: {line}{more}")


def _root_cause(err: Exception) -> str:
    failures = getattr(err, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(err, "controller_failure", err)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _let_tune_take_the_last_report(settle_s: float = 1.0) -> None:
    """Return only once Tune's trial actor has taken every report Ray Train passed it.

    Ray 2.60 deadlocks otherwise (seen on a loaded machine): TuneReportCallback hands rank 0's
    last report to this actor through a queue, and fit() can return before the actor's main
    thread takes it. This function's return then puts Tune's end-of-trial marker in the
    actor's one-slot result queue, the main thread takes the late report and blocks putting it
    in that full queue, of which it is the only reader, and the trial never ends. So wait until
    both queues stay empty for `settle_s` (the main thread moves a report from one to the other
    in a few instructions)."""
    from ray.train._internal.session import get_session

    session = get_session()
    queues = [q for q in (getattr(session, "_inter_actor_queue", None),
                          getattr(session, "result_queue", None)) if q is not None]
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_s:
        if not all(q.empty() for q in queues):
            quiet_since = time.monotonic()
        time.sleep(0.1)
