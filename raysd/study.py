"""The one place that knows Ray Tune: a Tuner whose trials each drive one Ray Train run."""
from __future__ import annotations

import dataclasses
import math
import os
import socket

import ray
import yaml
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysd.errors import ConfigError
from raysd.progress import ProgressPrinter
from raysd.results import TRIALS, StudyRecorder, Store, staging_dir
from raysd.spaces import Param, Space, load_space_text
from raysd.train import train_worker

DRIVER_CPU = 0.01  # a trial's driver only waits on trainer.fit(); Tune rejects 0
SPACE_FILE = "space.yaml"


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    study_uri: str
    best: dict | None  # the best completed trial's row of trials.parquet
    counts: dict[str, int]


class DefineByRun:
    """Optuna define-by-run space: a parameter with `when` is sampled only when it applies."""

    def __init__(self, params: tuple[Param, ...]):
        self.params = params

    def __call__(self, trial) -> None:
        values: dict = {}
        for param in self.params:
            if param.active(values):
                values[param.key] = param.suggest(trial)


def trial_driver(config: dict, space: Space, train_storage: str) -> None:
    """A Tune trial: build this trial's TrialConfig and run it as one TorchTrainer."""
    cfg = space.trial_config({p.key: config[p.key] for p in space.params if p.key in config})
    # Capacity is checked before the study starts, so a slow start is slowness, not infeasibility:
    # worker processes importing torch on a busy node can take over Ray's 60 s default.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"trial": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=per_worker),
        # Named after the Tune trial: a retried or restored trial finds its own checkpoints.
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(), storage_path=train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=space.study.max_failures,
                                                   controller_failure_limit=1),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrialFailed(_root_cause(err)) from None


class TrialFailed(RuntimeError):
    """A trial's training failed; the message is its root cause on one line."""


def _root_cause(err: Exception) -> str:
    failures = getattr(err, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(err, "controller_failure", err)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def cluster_capacity(space: Space, max_concurrent: int | None) -> int:
    """How many trials fit at once; ConfigError when not even one does (Ray would wait forever)."""
    cfg = space.trial_config()
    have = ray.cluster_resources()
    cpu_need = cfg.num_workers * cfg.cpus_per_worker + DRIVER_CPU
    gpu_need = cfg.num_workers if cfg.use_gpu else 0
    fits = math.floor(have.get("CPU", 0) / cpu_need + 1e-9)
    if gpu_need:
        fits = min(fits, math.floor(have.get("GPU", 0) / gpu_need + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"a trial needs {cpu_need:g} CPUs and {gpu_need} GPUs ({cfg.num_workers} workers), "
            f"the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs "
            "(set resources.workers / resources.use_gpu / resources.cpus_per_worker)")
    limit = max_concurrent or space.study.max_concurrent or fits
    return min(limit, fits)


def ensure_ray(address: str | None, verbose: bool) -> None:
    """Attach to a running cluster (ray job submit, ray start) or start a local one."""
    if ray.is_initialized():
        return
    kwargs = dict(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING",
                  configure_logging=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    # Local Ray: one extra logical CPU for the trial drivers, which only wait on their runs,
    # and every server on loopback (Ray would otherwise bind this machine's network address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    start_local_ray(num_cpus=(os.cpu_count() or 1) + 1, **kwargs)


def start_local_ray(**kwargs) -> None:
    """A private local Ray whose own processes know its address.

    Ray Train's placement-group cleaner asks the State API (served by the dashboard, kept on
    loopback) whether a run's controller is alive. Without an address it searches the host and
    fails when another Ray runs there, and finished trials' placement groups are never freed.
    Pinning the GCS port and exporting RAY_ADDRESS to the processes Ray spawns avoids that.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pinned = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in pinned}
    os.environ.update(pinned)
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **kwargs)
    finally:  # Ray's processes keep the pinned values; this process's later children do not
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_study(space: Space, study_uri: str, *, resume: bool = False, num_samples: int | None = None,
              max_concurrent: int | None = None, verbose: bool = False) -> StudyOutcome:
    """Run (or resume) a study; results land under study_uri. Ray must be initialised."""
    # Stage rows carry losses, not the validation metric, which comes with fine-tuning.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Save Tune's experiment state every step (it is small), so the results recorder, which
    # writes right after a save, never lists a trial that --resume would run again.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    if not verbose:  # our ProgressPrinter replaces Tune's tables
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    store = Store(study_uri)
    storage, name = study_uri.rstrip("/").rsplit("/", 1)
    if not resume:
        if store.exists("results", TRIALS) or store.exists("tuner.pkl"):
            raise ConfigError(f"study {study_uri} already exists: use --resume {study_uri} or "
                              "another --name")
        store.write_text(yaml.safe_dump({**space.doc, "search": _search_doc(space),
                                         "study": dataclasses.asdict(space.study)}, sort_keys=False),
                         SPACE_FILE)
    concurrency = cluster_capacity(space, max_concurrent)
    if space.doc.get("weights") == "builtin:demo":
        from raysd.bootstrap import demo_weights_dir

        demo_weights_dir(space.doc["model"])  # build once here, not in every trial at once
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, space=space, train_storage=f"{study_uri}/train"),
        {"cpu": DRIVER_CPU},
    )
    callbacks = [StudyRecorder(space, study_uri, staging_dir(study_uri)),
                 ProgressPrinter(space.study.metric, space.study.mode,
                                 num_samples or space.study.num_samples)]
    if resume:
        tuner = tune.Tuner.restore(study_uri, trainable=trainable, resume_errored=True,
                                   resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_searcher(space),
                                        scheduler=_scheduler(space),
                                        num_samples=num_samples or space.study.num_samples,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                      verbose=1 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()
    return summarize(study_uri, space)


class StageAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that skips rows without the metric: pre-training rows carry only losses."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def _searcher(space: Space) -> OptunaSearch | None:
    if not space.params:  # raysd run: one trial of the defaults, nothing to search
        return None
    import optuna

    sampler = optuna.samplers.TPESampler(seed=space.study.seed,
                                         n_startup_trials=space.study.n_startup_trials)
    return StageAwareOptunaSearch(space=DefineByRun(space.params), metric=space.study.metric,
                        mode=space.study.mode, sampler=sampler)


def _scheduler(space: Space):
    sched = space.study.scheduler
    if not sched:
        return None
    cfg = space.trial_config()
    total = sum(getattr(cfg, stage).steps for stage, _ in cfg.stages())
    # time_attr is our own trial-wide step counter: Tune's iteration restarts on retries.
    return ASHAScheduler(time_attr="progress", metric=sched.get("metric", space.study.metric),
                         mode=sched.get("mode", space.study.mode), max_t=sched.get("max_t", total),
                         grace_period=sched.get("grace_period", 1),
                         reduction_factor=sched.get("reduction_factor", 2))


def _search_doc(space: Space) -> dict:
    out = {}
    for p in space.params:
        doc = {"type": p.type}
        if p.type == "choice":
            doc["choices"] = list(p.choices)
        else:
            doc.update(low=p.low if p.type == "float" else int(p.low),
                       high=p.high if p.type == "float" else int(p.high), log=p.log)
            if p.step is not None:
                doc["step"] = p.step
        if p.when:
            doc["when"] = f"{p.when[0]} {p.when[1]} {p.when[2]:g}"
        out[p.key] = doc
    return out


def load_study_space(study_uri: str) -> Space:
    """The space a study was started with (saved beside its results), for --resume and report."""
    store = Store(study_uri)
    if not store.exists(SPACE_FILE):
        raise ConfigError(f"{study_uri}: not a raysd study (no {SPACE_FILE})")
    return load_space_text(store.read_text(SPACE_FILE), f"{study_uri}/{SPACE_FILE}",
                           name=study_uri.rstrip("/").rsplit("/", 1)[-1])


def summarize(study_uri: str, space: Space) -> StudyOutcome:
    store = Store(study_uri)
    rows = store.read_rows("results", TRIALS)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed")}
    metric, sign = space.study.metric, (1 if space.study.mode == "max" else -1)
    scored = [r for r in rows if r["status"] == "completed" and r.get(metric) is not None]
    best = max(scored, key=lambda r: sign * r[metric]) if scored else None
    return StudyOutcome(study_uri, best, counts)

