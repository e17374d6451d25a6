"""The one place that knows Ray Tune: a Tuner whose trials each drive one Ray Train run."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import pandas as pd
import yaml
from ray import tune

import raysd
from raysd import optuna_study
from raysd.chain import ROUNDS
from raysd.cluster import (autoscaler_node_types, check_shared_storage, drivers_may_leave_head,
                           plan_concurrency, study_driver_placement)
from raysd.credentials import redact_values
from raysd.errors import ConfigError
from raysd.janitor import start_janitor, stop_janitor
from raysd.paths import artifacts_uri
from raysd.console import StudyConsole
from raysd.results import StudyRecorder
from raysd.resume import (STATE_FORMAT, TRIAL_ID, FixedTrials, SeededTPESampler, StudyASHA,
                          StudySearch, chain_rungs, early_signals, finished_ids, fixed_configs)
from raysd.spaces import Param, Space, pretrain_stages
from raysd.storage import MODELS, SPACE_FILE, STUDY_FILE, TRAIN, TRIALS, Store
from raysd.study_folder import StudyFolder, best_row, status_counts
from raysd.trial import trial_driver

DRIVER_RETRIES = 2  # Tune's restarts of a trial whose driver died, when study.max_failures is -1

@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    study_uri: str
    best: dict | None  # the best completed trial's row of trials.parquet
    counts: dict[str, int]
    finished: bool  # every trial ended; False after Ctrl-C


class DefineByRun:
    """Optuna define-by-run space: a parameter with `when` is sampled only when it applies;
    `fixed` values (a chain's deepest T') count for `when` without being sampled."""

    def __init__(self, params: tuple[Param, ...], fixed: dict | None = None):
        self.params, self.fixed = params, fixed or {}

    def __call__(self, trial) -> None:
        values: dict = dict(self.fixed)
        for param in self.params:
            if param.active(values):
                values[param.key] = param.suggest(trial)


def models_uri(space: Space, study_uri: str) -> str | None:
    """Where trials save their fine-tuned models (None: study.keep_models is none)."""
    return None if space.study.keep_models == "none" else f"{study_uri}/{MODELS}"


def run_study(space: Space, study_uri: str, *, resume: bool = False, num_samples: int | None = None,
              max_concurrent: int | None = None, verbose: bool = False,
              variants: list[dict] | None = None, driver: Callable = None) -> StudyOutcome:
    """Run (or resume) a study; results land under study_uri. Ray must be initialised.

    With `variants` (raysd compare) the trials are those fixed points, one each, side by side,
    instead of a search. `driver` replaces trial_driver (benchmarks/driver_scale.py: a trial
    that only reports, to measure everything else)."""
    # Stage rows carry losses, not the validation metric, which comes with fine-tuning.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # One layout, ours (README: "What a study writes"): Tune's own TensorBoard, CSV and JSON
    # loggers would write a second copy of every row into each trial folder.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # --resume reads the study folder, never Tune's experiment state, which Tune otherwise
    # rewrites every 10 s with every trial in it: its bytes per result grow with the study.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "600")
    if not verbose:  # our StudyConsole replaces Tune's tables and its failed-trial tracebacks
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)  # "took 1.2 s" notes
    # Our searchers save nothing (the study folder is the state): Tune notes it once.
    logging.getLogger("ray.tune.search.searcher").setLevel(logging.ERROR)
    # Tune's result grid looks for the per-trial files its auto loggers (off, above) would write.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    store, folder = Store(study_uri), StudyFolder(study_uri)
    storage, name = study_uri.rstrip("/").rsplit("/", 1)
    if resume:  # a comparison's variants are in study.yaml; --resume never reads Tune's pickles
        variants = folder.about().get("variants")
    if variants:  # a comparison's trials are fixed points, never chains
        space = dataclasses.replace(space, study=dataclasses.replace(space.study, rounds="param"))
    total = len(variants) if variants else num_samples or space.study.num_samples
    # Everything that can refuse the study runs before its folder is written.
    if not resume and (store.exists("results", TRIALS) or store.exists("tuner.pkl")):
        raise ConfigError(f"study {study_uri} already exists: use --resume {study_uri} or "
                          "another --name")
    searched = bool(space.params) and not variants
    node_types = autoscaler_node_types()  # once: a cluster just started may take seconds to say
    concurrency = plan_concurrency(space, max_concurrent, total, node_types)
    check_shared_storage(study_uri)
    # A driver on a worker node (cluster.driver_placement) dies with it: Tune starts it again,
    # and its Train run resumes from its last checkpoint. trial.py re-raises at once a failure
    # that would only recur, so a failed trial's retries cost an actor start each; unlimited
    # Train restarts (-1) still give a driver a bounded number. Drivers on the head need none.
    retries = 0
    if drivers_may_leave_head(node_types):
        retries = space.study.max_failures if space.study.max_failures >= 0 else DRIVER_RETRIES
    if not resume:  # the folder is a study once SPACE_FILE exists: it is written last
        about = {"space": space.name, "raysd": raysd.__version__,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "state_format": STATE_FORMAT}
        if variants:  # raysd compare: its labels in order (the table's) and its trials (--resume's)
            about["compare"] = list(dict.fromkeys(v["variant"] for v in variants))
            about["variants"] = variants
        store.write_text(yaml.safe_dump(redact_values(about), sort_keys=False), STUDY_FILE)
        study = {**dataclasses.asdict(space.study), "num_samples": total}
        # No password in the study folder (credentials.py), wherever the space had one.
        store.write_text(yaml.safe_dump(redact_values({**space.doc, "search": _search_doc(space),
                                                       "study": study}), sort_keys=False), SPACE_FILE)
    if space.doc.get("weights") == "builtin:demo":
        from raysd.bootstrap import demo_theta  # torch: only for the built-in demo weights

        demo_theta(space.doc["model"])  # build once here, not in every trial at once
    journal = searched and not space.study.optuna_storage and "://" in study_uri
    mirrors = {str(optuna_study.journal_path(study_uri)): optuna_study.JOURNAL} if journal else {}
    # A resumed study is a fresh Tuner (resume.py): the finished trials are in trials.parquet,
    # the others run (again) under their own ids.
    finished = finished_ids(folder.trial_rows()) if resume else {}
    scheduler = None if variants else _scheduler(space)
    if scheduler and resume:
        rows = folder.history_rows()  # ended and running trials
        scheduler.replay(chain_rungs(rows, space.study.metric) if space.chain else early_signals(rows))
    if journal and resume:
        optuna_study.fetch_journal(study_uri)
    if searched:
        search = _searcher(space, study_uri, finished)
    else:
        search = FixedTrials([c for c in fixed_configs(total, variants) if c[TRIAL_ID] not in finished])
    left = total - len(finished) if searched else len(search.configs)
    callbacks = [StudyRecorder(space, study_uri, mirrors=mirrors),
                 StudyConsole(space, total, finished=len(finished)), *tracker_callbacks(space, study_uri)]
    janitor = None  # frees the placement groups of trials whose controller died (janitor.py)
    try:
        if left > 0:  # on Ctrl-C, Tune stops the trials and fit() returns early
            janitor = start_janitor()
            trainable = tune.with_parameters(
                driver or trial_driver, space=space, train_storage=f"{study_uri}/{TRAIN}",
                artifacts=artifacts_uri(space.study.artifacts, study_uri),
                models=models_uri(space, study_uri), janitor=janitor)
            tune.Tuner(
                tune.with_resources(trainable, study_driver_placement(node_types)),
                tune_config=tune.TuneConfig(search_alg=search, num_samples=left, scheduler=scheduler,
                                            max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                          verbose=1 if verbose else 0,
                                          failure_config=tune.FailureConfig(max_failures=retries)),
            ).fit()
    finally:  # the journal's last records, whatever the recorder's last upload caught
        try:
            if journal:
                optuna_study.push_journal(study_uri)
        finally:
            if janitor is not None:
                stop_janitor(janitor)
    return summarize(study_uri, space, total)


def _searcher(space: Space, study_uri: str, finished: dict[str, dict]) -> StudySearch:
    """The study's Optuna search, persisting every Optuna trial (optuna_study.py says where);
    `finished`: the trials --resume never runs again (resume.py)."""
    sampler = SeededTPESampler(space.study.seed, n_startup_trials=space.study.n_startup_trials)
    chain = space.chain
    return StudySearch(space=DefineByRun(space.sampled, {ROUNDS: max(chain.points)} if chain else None),
                       metric=space.study.metric, mode=space.study.mode, sampler=sampler,
                       finished=finished, points=space if chain else None,
                       study_name=optuna_study.study_name(study_uri),
                       storage=optuna_study.storage(study_uri, space.study.optuna_storage))


def tracker_callbacks(space: Space, study_uri: str) -> list:
    """Ray's MLflow / W&B logger callbacks for `study.loggers` (searched params, every row)."""
    out = []
    name = optuna_study.study_name(study_uri)
    for logger in space.study.loggers or ():
        if logger == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            # MLFLOW_TRACKING_URI (a server, a database) wins; else SQLite in the study folder.
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{study_uri}/mlflow.db"
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name,
                                            save_artifact=False))
        elif logger == "wandb":
            from raysd.trackers import StudyWandb

            # W&B's own variables apply (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE=offline,
            # WANDB_DIR); mode and dir are passed on, as Ray's logging actors do not inherit them.
            init = {k: os.environ[v] for k, v in (("mode", "WANDB_MODE"), ("dir", "WANDB_DIR"))
                    if os.environ.get(v)}
            out.append(StudyWandb(project=os.environ.get("WANDB_PROJECT", "raysd"), group=name,
                                  log_config=True, upload_checkpoints=False, **init))
    return out


def _scheduler(space: Space) -> StudyASHA | None:
    sched = space.study.scheduler
    if not sched:
        return None
    # Rungs sit at stage boundaries: the clock is pre-training stages done, the metric the early
    # signal each of them reports. Trials are compared after equal work (the same stages, the
    # same steps), and max_t lies beyond the longest trial's last stage, so no trial is stopped
    # for its T': a trial's last rung is its last pre-training stage, and fine-tuning follows.
    chain = space.chain
    if chain is not None:
        # A chain's rungs sit after its points' fine-tunes: chains are compared on the study's
        # own validation metric at the same T'; max_t lies past the last point.
        return StudyASHA(time_attr="points_done", metric=space.study.metric, mode=space.study.mode,
                         max_t=len(chain.points) + 1, grace_period=sched.get("grace_period", 1),
                         reduction_factor=sched.get("reduction_factor", 2))
    _, most = pretrain_stages(space)
    return StudyASHA(time_attr="stages_done", metric="knn_accuracy", mode="max",
                         max_t=most + 1, grace_period=sched.get("grace_period", 1),
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


def summarize(study_uri: str, space: Space, total: int) -> StudyOutcome:
    rows = StudyFolder(study_uri).trial_rows()
    counts = status_counts(pd.DataFrame(rows))
    best = best_row(rows, space.study.metric, space.study.mode)
    return StudyOutcome(study_uri, best, counts, finished=len(rows) >= total)
