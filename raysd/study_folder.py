"""A study folder read without Ray: its space, trials, history, statuses and best trial.

`<storage>/<study>/` on any filesystem storage.Store opens (local, NFS, s3://, gs://):
    space.yaml                    the space the study runs, overrides applied
    study.yaml                    the space's name, raysd version, start time, state_format (resume.py);
                                  a comparison's variants
    results/trials.parquet        one row per ended trial, in the order they ended
    results/history/              every reported row of every trial, ended or running: a Parquet
                                  dataset of parts <trial id>-<n>.parquet, one schema, appended
                                  and never rewritten (history.py)
    results/history.parquet,      the history of studies written before that: the ended trials'
    results/history_parts/        rows, and the running trials' parts; still read
A `.<file>.tmp-<hex>` beside a file is a write a crash cut short: never read (Store.list leaves
it out), and deleted by the next run or --resume (ResultsWriter).
"""
from __future__ import annotations

import datetime

import pandas as pd
import yaml

from raysd.config import current_columns
from raysd.errors import ConfigError
from raysd.history import read_history
from raysd.spaces import Space, load_space_text
from raysd.storage import SPACE_FILE, STUDY_FILE, TRIALS, Store

STATUSES = ("completed", "stopped", "failed")  # stopped: ended early by the scheduler (ASHA)


def ranked(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """raysd's one definition of the best trial: completed trials with a value of the study's
    validation `metric`, best first by `mode`; ties keep the order the trials ended in."""
    if metric not in trials.columns:
        return trials.iloc[0:0]
    done = trials[(trials["status"] == "completed") & trials[metric].notna()]
    return done.sort_values(metric, ascending=mode == "min", kind="stable")


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The first of ranked() over these trials.parquet rows, as given; None when none qualifies.
    Plain Python (tests/test_study_folder.py holds the two to the same answer): the driver asks
    at every trial's end, where a DataFrame would cost milliseconds (benchmarks/driver_scale.py)."""
    better = float.__lt__ if mode == "min" else float.__gt__
    best, best_value = None, None
    for row in rows:
        value = row.get(metric)
        if row.get("status") != "completed" or value is None or value != value:  # NaN
            continue
        value = float(value)
        if best is None or better(value, best_value):  # strictly: ties keep the first ended
            best, best_value = row, value
    return best


def status_counts(trials: pd.DataFrame) -> dict[str, int]:
    """Trials per status, every status present (0 when none)."""
    return {s: int((trials["status"] == s).sum()) if len(trials) else 0 for s in STATUSES}


def _present(row: pd.Series) -> dict:
    return {k: v for k, v in row.items() if not (isinstance(v, float) and v != v)}  # drop NaN


class StudyFolder:
    """One study folder, local path or URI; `uri` is used as given in every message."""

    def __init__(self, uri: str):
        self.uri = uri
        self.store = Store(uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def is_study(self) -> bool:
        return self.store.exists(SPACE_FILE)

    def space_doc(self) -> dict:
        """space.yaml as saved, not validated ({} when absent)."""
        return self.store.read_yaml(SPACE_FILE)

    def space(self) -> Space:
        """The space the study was started with, validated; ConfigError when this is no study."""
        if not self.is_study():
            raise ConfigError(f"{self.uri}: not a raysd study (no {SPACE_FILE})")
        doc = self.space_doc()
        sched = (doc.get("study") or {}).get("scheduler")
        if isinstance(sched, dict):  # studies saved when ASHA ran on step counts: keys now gone
            for key in ("metric", "mode", "max_t"):
                sched.pop(key, None)
        if isinstance(doc.get("study"), dict):  # studies saved before chains sampled T'
            doc["study"].setdefault("rounds", "param")
        return load_space_text(yaml.safe_dump(doc, sort_keys=False), f"{self.uri}/{SPACE_FILE}",
                               name=self.name)

    def objective(self) -> tuple[str, str]:
        """(metric, mode) the study chooses by, from space.yaml without validating it
        (run_study always writes both; the fallbacks are StudySettings' defaults)."""
        settings = self.space_doc().get("study") or {}
        return settings.get("metric", "val_accuracy"), settings.get("mode", "max")

    def about(self) -> dict:
        """study.yaml: the space's name, raysd version, start time; {} when absent."""
        return self.store.read_yaml(STUDY_FILE)

    def compare_variants(self) -> list[str] | None:
        """The variants of a `raysd compare` study, in order; None for a study of `raysd tune`."""
        return self.about().get("compare")

    def trial_rows(self) -> list[dict]:
        """trials.parquet as rows, in the order the trials ended ([] before the first one).
        Columns of studies written before the schema are renamed to today's (config.LEGACY_COLUMNS)."""
        rows = self.store.read_rows("results", TRIALS)
        renames = current_columns(list(rows[0])) if rows else {}
        return [{renames.get(k, k): v for k, v in row.items()} for row in rows] if renames else rows

    def trials(self) -> pd.DataFrame:
        """trials.parquet; its index is each trial's position, so the order trials ended in."""
        trials = pd.DataFrame(self.trial_rows())
        if not trials.empty and "status" not in trials.columns:
            raise ConfigError(f"{self.uri}: results/{TRIALS} has no status column (not written by raysd)")
        return trials

    def ranked(self, trials: pd.DataFrame | None = None) -> pd.DataFrame:
        """ranked() of this study's trials by its own metric and mode."""
        return ranked(self.trials() if trials is None else trials, *self.objective())

    def counts(self) -> dict[str, int]:
        return status_counts(self.trials())

    def best(self) -> dict | None:
        """The best trial's row by ranked() (missing values left out); None when none qualifies."""
        done = self.ranked()
        return _present(done.iloc[0]) if len(done) else None

    def trial(self, trial_id: str) -> dict | None:
        """A trial's row of trials.parquet (missing values left out); None when it has none."""
        trials = self.trials()
        match = trials[trials["trial_id"] == trial_id] if not trials.empty else trials
        return _present(match.iloc[0]) if len(match) else None

    def history_rows(self) -> list[dict]:
        """Every reported row of every trial, ended or still running (history.py's read_history)."""
        return read_history(self.store)

    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self.history_rows())

    def updated(self) -> datetime.datetime | None:
        """When trials.parquet (else space.yaml) last changed; None when neither exists."""
        paths = [p for p in (("results", TRIALS), (SPACE_FILE,)) if self.store.exists(*p)]
        return max((self.store.fs.get_file_info(self.store.path(*p)).mtime for p in paths), default=None)
