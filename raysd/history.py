"""A study's history - every row every trial reported - as a Parquet dataset that only grows.

    results/history/<trial id>-<n>.parquet   a trial's n-th part, rows in the order reported

Every part has the study's one schema (history_schema, kept from the first part on --resume), so
pandas, pyarrow.dataset and anything else that reads a folder of Parquet read it as one table.
A file is written once and never rewritten: the cost of a write is its new rows, not the study's.
Studies written before this layout have results/history.parquet (ended trials) and
results/history_parts/ (running trials); read_history reads them too, and HistoryWriter leaves
them as they are. Ray-free.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raysd.storage import HISTORY, PARTS, Store

HISTORY_DIR = "history"  # results/history/
# Our own keys in a reported row; Tune's bookkeeping keys (dates, pids, iterations) are dropped.
# `attempt` counts the trial's worker-group restarts: a step rerun after one is a new row.
# `points_done`: on a chain's row of a fine-tuned point, how many points it has (ASHA's clock).
ROW_KEYS = ("stage", "round", "step", "progress", "attempt", "points_done", "loss", "mae_loss",
            "distill_loss", "ce_loss", "lr", "samples_per_s", "knn_accuracy")
SCALAR_KEYS = ROW_KEYS[6:]
_TYPES = {"stage": pa.string(), "round": pa.int64(), "step": pa.int64(), "progress": pa.int64(),
          "attempt": pa.int64(), "points_done": pa.int64()}  # the rest are float64
# What identifies a history row within its trial: a step reported again after --resume ran its
# trial again from a checkpoint is one row (the last wins); a rerun after a restart has a new
# `attempt`.
ROW_IDENTITY = ("stage", "round", "step", "attempt")


def history_row(trial_id: str, result: dict) -> dict:
    """A reported result as a history row: our keys and every val_/test_ metric."""
    row = {"trial_id": trial_id, **{k: result[k] for k in ROW_KEYS if k in result}}
    row.update({k: result[k] for k in result if k.startswith(("val_", "test_"))})
    return row


def history_schema(metrics: Sequence[str]) -> pa.Schema:
    """trial_id, ROW_KEYS, then the study's val_/test_ `metrics` (writers.history_metrics)."""
    names = ["trial_id", *ROW_KEYS, *(m for m in metrics if m not in ROW_KEYS)]
    return pa.schema([(n, pa.string() if n == "trial_id" else _TYPES.get(n, pa.float64()))
                      for n in names])


def part_name(trial_id: str, index: int) -> str:
    """The name of a trial's index-th history part."""
    return f"{trial_id}-{index:05d}.parquet"


def part_trial(name: str) -> str:
    """The trial id a history part belongs to (trial ids may hold '-', the index does not)."""
    return name.rsplit("-", 1)[0]


def part_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".")[0])


def row_identity(row: dict) -> tuple:
    """A history row's ROW_IDENTITY values: which row it is within its trial."""
    return tuple(row.get(k) for k in ROW_IDENTITY)


def unique_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per trial and ROW_IDENTITY, the last one read winning, in first-read order."""
    return list({(row.get("trial_id"), *row_identity(row)): row for row in rows}.values())


def read_history(store: Store) -> list[dict]:
    """Every history row of the study (ended and running trials), each identity once: the old
    layout's files first, then the dataset, parts in order."""
    rows = store.read_rows("results", HISTORY)
    for name in store.list("results", PARTS):
        rows += store.read_rows("results", PARTS, name)
    names = store.list("results", HISTORY_DIR)
    if names:  # one schema, one scan: far faster than a file at a time on an object store
        paths = [store.path("results", HISTORY_DIR, n) for n in names]
        rows += ds.dataset(paths, filesystem=store.fs, format="parquet").to_table().to_pylist()
    return unique_rows(rows)


class HistoryWriter:
    """Appends a study's history: each running trial's new rows become its next part every
    `part_seconds` (so a driver crash loses at most that much and its latest row) and when it
    ends. The driver holds
    only the rows of running trials since their last part, and the identities of their rows.

    A trial run again from a checkpoint (--resume, or a failed trial retried) reports some steps
    a second time; when it ends, its parts are replaced by one part holding each row once (the
    cost of that trial's rows, never the study's)."""

    def __init__(self, store: Store, metrics: Sequence[str] = (), part_seconds: float = 30.0):
        self.store, self.part_seconds = store, part_seconds
        store.remove_temporaries("results", HISTORY_DIR)  # a crashed driver's cut-short writes
        self._old: dict[str, list[tuple[str, ...]]] = {}  # trial id -> its parts from earlier runs
        names = store.list("results", HISTORY_DIR)
        for where, found in ((("results", PARTS), store.list("results", PARTS)),
                             (("results", HISTORY_DIR), names)):
            for name in found:
                self._old.setdefault(part_trial(name), []).append((*where, name))
        # --resume keeps the study's first schema, whatever this raysd's would be
        self.schema = (pq.read_schema(store.fs.open_input_file(store.path("results", HISTORY_DIR, names[0])))
                       if names else history_schema(metrics))
        self._next = {part_trial(n): part_index(n) + 1 for n in names}  # names are sorted
        self._pending: dict[str, list[dict]] = {}  # running trial -> rows not yet in a part
        self._seen: dict[str, set] = {}  # running trial -> identities of its rows so far
        self._reported: set[str] = set()  # trials that reported a step twice: compacted at end
        self._dropped: set[str] = set()  # keys without a column, said once each
        self._parted_at = time.time()

    def add(self, trial_id: str, row: dict) -> None:
        """A running trial's row, written with its next part."""
        seen = self._seen.get(trial_id)
        if seen is None:  # its first row in this run: what its earlier runs wrote
            seen = self._seen[trial_id] = {row_identity(r) for r in self._old_rows(trial_id)}
        identity, pending = row_identity(row), self._pending.setdefault(trial_id, [])
        if pending and row_identity(pending[-1]) == identity:  # a stage's last row, reported
            pending[-1] = row  # again with the stage's summary (recipe.run_trial): the last wins
            return
        if identity in seen:
            self._reported.add(trial_id)
        seen.add(identity)
        pending.append(row)

    def end_trial(self, trial_id: str) -> None:
        """Write the ended trial's last rows, each row once; forget the trial."""
        self._write_part(trial_id)
        if trial_id in self._reported:
            self._compact(trial_id)
        self._seen.pop(trial_id, None)
        self._old.pop(trial_id, None)

    def due(self) -> bool:
        return time.time() - self._parted_at >= self.part_seconds

    def write_parts(self, hold_last: bool = True) -> None:
        """Each running trial's rows since its last part, as its next part. Its latest row
        waits (`hold_last`) for the next one: the stage's summary may report it again."""
        for tid in list(self._pending):
            self._write_part(tid, hold_last)
        self._parted_at = time.time()

    def _write_part(self, tid: str, hold_last: bool = False) -> None:
        rows = self._pending.pop(tid, [])
        if hold_last and rows:
            self._pending[tid] = [rows.pop()]
        if not rows:
            return
        index = self._next.get(tid, 0)
        self._write(rows, part_name(tid, index))
        self._next[tid] = index + 1
        self._old.setdefault(tid, []).append(("results", HISTORY_DIR, part_name(tid, index)))

    def _write(self, rows: list[dict], name: str) -> None:
        extra = {k for row in rows for k in row} - set(self.schema.names) - self._dropped
        for key in sorted(extra):  # a key our own code reports but the schema lacks: a bug to see
            print(f"raysd: history has no column {key!r}; its values are not recorded",
                  file=sys.stderr, flush=True)
        self._dropped |= extra
        table = pa.Table.from_pylist(rows, schema=self.schema)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)  # encoded whole first: a failure leaves no truncated file
        self.store.write_bytes(buffer.getvalue().to_pybytes(), "results", HISTORY_DIR, name)

    def _old_rows(self, tid: str) -> list[dict]:
        return [row for where in self._old.get(tid, []) for row in self.store.read_rows(*where)]

    def _compact(self, tid: str) -> None:
        """Replace the trial's parts by one with each row once; a crash between the write and the
        deletes leaves rows twice, which read_history reads once."""
        parts = self._old.pop(tid, [])
        rows = unique_rows(row for where in parts for row in self.store.read_rows(*where))
        self._pending[tid] = rows
        self._write_part(tid)
        for where in parts:
            self.store.delete(*where)
        self._reported.discard(tid)

