"""A trial run as a chain (study.rounds: chain), free of Ray: one (gamma, lambda, ...) trains
further pre-training and rounds 1..T_max once, and fine-tunes + evaluates after further
pre-training (T' = 0) and after every round - each (gamma, lambda, T') a result of its own, the
paper's Figure 4 for every configuration a study visits.

A fine-tune after round t draws exactly what the fine-tune of a trial of T' = t draws (fine-
tuning's randomness is seeded from (seed, "finetune", round 0, step, rank) whatever T' it
follows), so each point equals an independent run of its T'. The trial's summary keeps every
point under `point_<t>.<metric>` and, unprefixed, the metrics of its best point on validation
(`best_rounds` says which): what Tune and "best" read.
"""
from __future__ import annotations

import dataclasses
import math
import re

from raysd.config import TrialConfig

POINT_KEY = re.compile(r"point_(\d+)\.(.+)")
ROUNDS = "self_distill.rounds"


@dataclasses.dataclass(frozen=True)
class Chain:
    """Which T' values a chain fine-tunes after (the searched range of self_distill.rounds), and
    the validation metric that names its best point."""

    points: tuple[int, ...]
    metric: str = "val_accuracy"
    mode: str = "max"

    def plan(self, cfg: TrialConfig) -> list[tuple[str, int]]:
        """(stage, round) pairs in order: ("finetune", t) is the fine-tune of point T' = t."""
        plan = [("further_pretrain", 0)] + ([("finetune", 0)] if 0 in self.points else [])
        for t in range(1, max(self.points) + 1):
            plan.append(("self_distill", t))
            if t in self.points:
                plan.append(("finetune", t))
        return plan

    def config(self, cfg: TrialConfig) -> TrialConfig:
        """The chain's own config: rounds up to the deepest point."""
        return dataclasses.replace(cfg, self_distill=dataclasses.replace(
            cfg.self_distill, rounds=max(self.points)))

    def record(self, summary: dict, t: int, metrics: dict) -> bool:
        """Put point t's metrics in the trial's summary; True when it is the best point so far
        (the summary's unprefixed metrics are then its). Ties keep the smaller T'."""
        summary.update({f"point_{t}.{k}": v for k, v in metrics.items()})
        value, best = metrics.get(self.metric), summary.get(self.metric)
        if not _number(value):
            return False
        if _number(best) and "best_rounds" in summary and not (
                value > best if self.mode == "max" else value < best):
            return False
        summary.update(metrics)
        summary["best_rounds"] = t
        return True


def points(summary: dict) -> dict[int, dict]:
    """T' -> that point's metrics, from a chain's summary (or any report carrying it)."""
    out: dict[int, dict] = {}
    for key, value in summary.items():
        match = POINT_KEY.fullmatch(key)
        if match:
            out.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return dict(sorted(out.items()))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
