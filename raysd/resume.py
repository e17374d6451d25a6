"""Which trials a study runs, under which ids, and how `--resume` picks them up from raysd's own
files - never from Tune's saved state (tuner.pkl, search_gen_state-*.json, a pickle too), which
anyone who can write the study folder could make run code on the head.

Every trial carries its raysd id in its config (TRIAL_ID), fixed before it starts: a searched
trial is named after its Optuna trial number, a fixed trial (raysd run, a comparison's variant)
after its place in the study. Ray Train runs, history rows, TensorBoard runs and models are filed
under that id, so a trial run again by `--resume` finds its own checkpoints (train/<id>/).

A resumed study is a fresh Tuner over the same folder:
- the trials that finished are the completed and stopped rows of results/trials.parquet;
- a searched study's other trials are the Optuna trials (the searcher's state) without such a
  row: each runs again first, with its recorded params, and its Optuna trial, if still RUNNING,
  is told its outcome once; then Optuna proposes the rest (SeededTPESampler keeps the proposals
  those of an uninterrupted run);
- a fixed study's trials are listed in study.yaml (a comparison's variants) or numbered up to
  num_samples (raysd run); each without a finished row runs.
A failed trial runs again, as Tune's `resume_errored` did. ASHA's rungs are refilled from the
early signals in the history (StudyASHA).
"""
from __future__ import annotations

import re

import types

import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raysd.chain import ROUNDS
from raysd.errors import ConfigError
from raysd.storage import TRIAL_ID

# study.yaml's `state_format`: 2 = resumed from raysd's own files (this module). Studies
# without it were resumed through Tune's pickled state, which raysd no longer loads.
STATE_FORMAT = 2
FINISHED = ("completed", "stopped")  # never run again (ASHA never resumes a stopped trial)
# A chain's point in the Optuna study: its chain's raysd id and its T' (user attributes).
CHAIN_ATTR, POINT_ATTR = "raysd_chain", "raysd_point"


def searched_id(number: int) -> str:
    """The raysd id of a searched trial: its place among the Optuna trials the sampler drew
    (its Optuna trial's number, less the chains' points told before it)."""
    return f"trial_{number:04d}"


def drawn_number(study: optuna.Study, number: int) -> int:
    """An Optuna trial's place among the trials the sampler drew (a chain study's points, told
    as trials of their own, do not count): what its raysd id and its sampler seed follow, so a
    study proposes the same, under the same ids, however its points interleave."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and POINT_ATTR not in t.user_attrs)


def fixed_configs(total: int, variants: list[dict] | None) -> list[dict]:
    """The configs of a study without a search: a comparison's variants, else `total` trials of
    the space as it is (raysd run). Ids: `<variant>-s<seed>`, `-f<finetune.seed>` added where a
    variant sets it (unique in a comparison), or the trial's place."""
    if variants:  # a label may hold spaces and quotes (`self_distill T'=1`): not in a folder name
        return [{TRIAL_ID: f"{re.sub(r'[^A-Za-z0-9._]+', '_', v['variant'])}-s{v['values']['seed']}"
                           + (f"-f{v['values']['finetune.seed']}" if "finetune.seed" in v["values"] else ""),
                 "variant": v} for v in variants]
    return [{TRIAL_ID: searched_id(i)} for i in range(total)]


def finished_ids(rows: list[dict]) -> dict[str, dict]:
    """trial id -> its trials.parquet row, for the trials `--resume` never runs again: every
    row of the trial (a chain has one per point) finished; a chain's row is its best point's."""
    out: dict[str, dict] = {}
    failed = {row["trial_id"] for row in rows if row.get("status") not in FINISHED}
    for row in rows:
        if row["trial_id"] not in failed and (row["trial_id"] not in out or row.get("best_point")):
            out[row["trial_id"]] = row
    return out


def check_resumable(about: dict, uri: str) -> None:
    """ConfigError (one line) for a study whose unfinished trials only Tune's pickles describe."""
    if about.get("state_format") != STATE_FORMAT:
        raise ConfigError(f"--resume {uri}: started by raysd {about.get('raysd', '?')}, whose studies "
                          "resume only through Tune's pickled state, which raysd no longer loads "
                          "(it could run code); start the study again")


class FixedTrials(Searcher):
    """The given configs, in order, one trial each (a comparison, raysd run)."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self.configs = list(configs)

    def suggest(self, trial_id: str) -> dict | str | None:
        return self.configs.pop(0) if self.configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        raise NotImplementedError  # nothing to save: --resume reads the study folder


class SeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial n (drawn_number) are seeded from (seed, n): a proposal
    depends on the seed, the trial's number and the study's history only, not on how many proposals this
    sampler object made before - so a resumed study proposes what an uninterrupted one would."""

    def __init__(self, seed: int | None, **options):
        super().__init__(seed=seed, **options)
        self.seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        if self.seed is not None:
            number = drawn_number(study, trial.number)
            self._rng.rng.seed([self.seed, number])  # TPE's own draws
            self._random_sampler._rng.rng.seed([self.seed, number, 1])  # its startup trials


class StudySearch(OptunaSearch):
    """OptunaSearch over the study's Optuna storage that names each trial after its Optuna
    trial and, on --resume, first runs again the Optuna trials `finished` lacks (see above)."""

    def __init__(self, *, finished: dict[str, dict], points=None, **options):
        super().__init__(**options)
        self._reruns = []
        self._point_space = points  # a chain study's Space: each point becomes an Optuna trial
        self._chains: dict[str, tuple[str, dict, dict]] = {}  # Tune id -> raysd id, params, distributions
        drawn, self._ids = 0, {}  # Optuna trial number -> raysd id
        for trial in self._ot_study.get_trials(deepcopy=False):
            if POINT_ATTR in trial.user_attrs:  # a chain's point, told when it was reported
                continue
            self._ids[trial.number], drawn = searched_id(drawn), drawn + 1
            row = finished.get(self._ids[trial.number])
            if row is None:
                self._reruns.append(trial)
            elif trial.state == optuna.trial.TrialState.RUNNING:  # ended, but never told
                value = row.get(self.metric) if row["status"] == "completed" else None
                self._ot_study.tell(trial.number, value, state=optuna.trial.TrialState.COMPLETE
                                    if value is not None else optuna.trial.TrialState.PRUNED)

    @property
    def reruns(self) -> int:
        return len(self._reruns)

    def suggest(self, trial_id: str) -> dict | None:
        if self._reruns:
            trial = self._reruns.pop(0)
            if trial.state == optuna.trial.TrialState.RUNNING:  # told when this run ends
                running = optuna.Trial(self._ot_study, trial._trial_id)
                self._ot_trials[trial_id] = running
                # A driver killed while it drew the trial's params left some unset: the space
                # draws them now (a param already set is read back, never redrawn).
                self._space(running)
                trial = self._ot_study._storage.get_trial(trial._trial_id)
            raysd_id = self._ids[trial.number]
            self._chains[trial_id] = (raysd_id, trial.params, trial.distributions)
            return {**trial.params, TRIAL_ID: raysd_id}
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        raysd_id = searched_id(drawn_number(self._ot_study, ot_trial.number))
        self._chains[trial_id] = (raysd_id, ot_trial.params, ot_trial.distributions)
        return {**config, TRIAL_ID: raysd_id}

    def _tell_point(self, trial_id: str, result: dict) -> None:
        """A chain's point as a completed Optuna trial of its own, with T' among its params (so
        TPE models T' as in a param study), once: a chain run again finds it told."""
        raysd_id, params, distributions = self._chains[trial_id]
        t = int(result["rounds"])
        told = {(tr.user_attrs.get(CHAIN_ATTR), tr.user_attrs.get(POINT_ATTR))
                for tr in self._ot_study.get_trials(deepcopy=False)}
        if (raysd_id, t) in told or self.metric not in result:
            return
        rounds = next(p for p in self._point_space.params if p.key == ROUNDS)
        values = self._point_space.active({**params, ROUNDS: t})
        dists = {**distributions, ROUNDS: optuna.distributions.IntDistribution(
            int(rounds.low), int(rounds.high), step=int(rounds.step or 1))}
        self._ot_study.add_trial(optuna.trial.create_trial(
            params=values, distributions={k: dists[k] for k in values}, value=result[self.metric],
            user_attrs={CHAIN_ATTR: raysd_id, POINT_ATTR: t}))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._point_space is not None and "points_done" in result and trial_id in self._chains:
            self._tell_point(trial_id, result)
        # Stage rows carry losses only; a rerun whose Optuna trial had ended has none to tell.
        if self.metric in result and trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        raise NotImplementedError  # the Optuna storage is the searcher's state


class StudyASHA(ASHAScheduler):
    """ASHA that files trials under their raysd ids, so that --resume can refill its rungs from
    the study's history (replay) and a trial run again keeps the rungs it had reached."""

    def replay(self, signals: dict[str, list[float]]) -> None:
        """Each trial's values at its rungs in order: early signals, one per pre-training stage
        it ended, or a chain's metric at each of its points."""
        for tid, values in signals.items():
            for stages_done, value in enumerate(values, 1):
                self._brackets[0].on_result(_named(tid), stages_done, self._metric_op * value)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, _named(trial.config[TRIAL_ID]))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, _named(trial.config[TRIAL_ID]), result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, _named(trial.config[TRIAL_ID]), result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, _named(trial.config[TRIAL_ID]))


def _named(trial_id: str):
    return types.SimpleNamespace(trial_id=trial_id)  # all ASHA reads of a trial


def early_signals(rows: list[dict]) -> dict[str, list[float]]:
    """trial id -> its early signal (knn_accuracy) after each pre-training stage, in order;
    a stage's row written twice (a history part and the end, a restart) counts once."""
    out: dict[str, dict] = {}
    signalled = (r for r in rows if _present(r.get("knn_accuracy")))
    for row in sorted(signalled, key=lambda r: r.get("progress", 0)):
        out.setdefault(row["trial_id"], {})[(row["stage"], row.get("round"))] = row["knn_accuracy"]
    return {tid: list(values.values()) for tid, values in out.items()}


def chain_rungs(rows: list[dict], metric: str) -> dict[str, list[float]]:
    """trial id -> the study's metric at each point its chain reported, in order (ASHA's rungs
    of a chain study); a point's row written twice counts once."""
    out: dict[str, dict] = {}
    for row in rows:
        if _present(row.get("points_done")) and _present(row.get(metric)):
            out.setdefault(row["trial_id"], {})[int(row["points_done"])] = row[metric]
    return {tid: [values[k] for k in sorted(values)] for tid, values in out.items()}


def _present(value) -> bool:
    return value is not None and value == value  # not NaN
