"""The study's console lines instead of Ray's tables: a line per trial event, and every
PROGRESS_SECONDS one line per running trial (stage, round, step, samples/s, ETA)."""
from __future__ import annotations

import os
import sys
import time

from ray.tune import Callback

from raysd.resume import TRIAL_ID
from raysd.spaces import Space
from raysd.study_folder import best_row

PROGRESS_SECONDS = float(os.environ.get("RAYSD_PROGRESS_SECONDS", "30"))


class StudyConsole(Callback):
    """A Tune callback that prints; it writes nothing."""

    def __init__(self, space: Space, total: int, stream=None, finished: int = 0):
        self.space, self.total = space, total
        self.metric, self.mode = space.study.metric, space.study.mode
        self.stream = stream
        self._best: dict | None = None  # the best completed trial so far (study_folder.best_row)
        self.started = time.time()
        self.finished, self.failed = finished, 0  # finished: before a --resume
        self._resumed = finished  # the ETA counts only this run's pace
        self._latest: dict[str, dict] = {}  # trial id -> its last reported row
        self._shown_at = time.time()

    def _print(self, text: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {text}", file=self.stream or sys.stdout, flush=True)

    def _counts(self, trials, ended) -> str:
        # Tune calls back before it updates the ended trial's status: count that one apart.
        running = sum(t.status == "RUNNING" and t is not ended for t in trials)
        top = self._best
        best = "" if top is None else f" | best {self.metric} {top[self.metric]:.4f} ({top['trial_id']})"
        left = self.total - self.finished
        eta = ""
        ended = self.finished - self._resumed  # in this run
        if ended and left > 0:  # at the pace so far
            eta = f" | ETA {_duration((time.time() - self.started) / ended * left)}"
        return f"{self.finished}/{self.total} finished, {running} running, {self.failed} failed{best}{eta}"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = dict(trial.config)
        tid = config.pop(TRIAL_ID)
        variant = config.pop("variant", None)  # raysd compare: a label and its fixed values
        if variant:
            config = {"variant": variant["variant"], **{k: v for k, v in variant["values"].items()
                                                        if k in ("seed", "finetune.seed")}}
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in config.items())
        self._print(f"trial {tid} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "stage" in result:
            self._latest[trial.config[TRIAL_ID]] = result

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self._shown_at < PROGRESS_SECONDS:
            return
        self._shown_at = time.time()
        for trial in trials:
            row = self._latest.get(trial.config[TRIAL_ID])
            if trial.status == "RUNNING" and row is not None:
                self._print(f"trial {trial.config[TRIAL_ID]} {self.where(trial.config, row)}")

    def where(self, config: dict, row: dict) -> str:
        """'self_distill round 1/2 step 40/100, 512 samples/s, ETA 3m10s' for a trial's last row."""
        values = {p.key: config[p.key] for p in self.space.params if config.get(p.key) is not None}
        if config.get("variant"):
            values.update(config["variant"]["values"])
        cfg = self.space.trial_config(values)
        chain = self.space.chain if not config.get("variant") else None
        plan = chain.plan(chain.config(cfg)) if chain else cfg.stages()
        cfg = chain.config(cfg) if chain else cfg  # a chain trains rounds up to its deepest point
        stage, round_ = row["stage"], row.get("round", 0)
        stage_cfg = getattr(cfg, stage)
        text = stage + (f" round {round_}/{cfg.self_distill.rounds}" if stage == "self_distill" else "")
        text += f" step {row.get('step', 0)}/{stage_cfg.steps}"
        rate = row.get("samples_per_s")
        if rate:
            total = sum(getattr(cfg, s).steps for s, _ in plan)
            left = max(0, total - row.get("progress", 0))
            text += f", {rate:.0f} samples/s, ETA {_duration(left * stage_cfg.batch_size / rate)}"
        return text

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        tid = trial.config[TRIAL_ID]
        self._latest.pop(tid, None)
        last = trial.last_result or {}
        value = last.get(self.metric)
        if last.get("trial_done"):  # the best of the best so far and this one: O(1) per trial
            done = {"trial_id": tid, "status": "completed", self.metric: value}
            self._best = best_row([r for r in (self._best, done) if r], self.metric, self.mode)
        self.finished += 1
        shown = "stopped early" if not last.get("trial_done") else f"{self.metric} {_fmt(value)}"
        self._print(f"trial {tid} {shown} | {self._counts(trials, trial)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from raysd.results import error_line

        tid = trial.config[TRIAL_ID]
        self._latest.pop(tid, None)
        self.finished += 1
        self.failed += 1
        self._print(f"trial {tid} FAILED: {error_line(trial)} | {self._counts(trials, trial)}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
