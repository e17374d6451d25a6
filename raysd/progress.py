"""A compact study progress view: one line per trial event instead of Ray's full tables."""
from __future__ import annotations

import sys
import time

from ray.tune import Callback


class ProgressPrinter(Callback):
    def __init__(self, metric: str, mode: str, total: int, stream=None):
        self.metric, self.mode, self.total = metric, mode, total
        self.stream = stream
        self.best: tuple[float, str] | None = None
        self.started = time.time()
        self.finished = self.failed = 0

    def _print(self, text: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {text}", file=self.stream or sys.stdout, flush=True)

    def _counts(self, trials, ended) -> str:
        # Tune calls back before it updates the ended trial's status: count that one apart.
        running = sum(t.status == "RUNNING" and t is not ended for t in trials)
        best = "" if self.best is None else f" | best {self.metric} {self.best[0]:.4f} ({self.best[1]})"
        return f"{self.finished}/{self.total} finished, {running} running, {self.failed} failed{best}"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = dict(trial.config)
        variant = config.pop("variant", None)  # raysd compare: a label and its fixed values
        if variant:
            config = {"variant": variant["variant"], "seed": variant["values"].get("seed")}
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in config.items())
        self._print(f"trial {trial.trial_id} started: {params}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric)
        if value is not None and last.get("trial_done"):
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (value, trial.trial_id)
        self.finished += 1
        shown = "stopped early" if not last.get("trial_done") else f"{self.metric} {_fmt(value)}"
        self._print(f"trial {trial.trial_id} {shown} | {self._counts(trials, trial)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from raysd.results import error_line

        self.finished += 1
        self.failed += 1
        self._print(f"trial {trial.trial_id} FAILED: {error_line(trial)} | {self._counts(trials, trial)}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
