"""The study console without starting Ray: its counts line keeps the best completed trial."""
from __future__ import annotations

import io
from types import SimpleNamespace

from raysd.console import StudyConsole
from raysd.resume import TRIAL_ID
from raysd.spaces import load_space


def _trial(tid: str, value, done: bool = True):  # what StudyConsole reads of a Tune trial
    return SimpleNamespace(config={TRIAL_ID: tid}, status="TERMINATED",
                           last_result={"val_accuracy": value, "trial_done": done})


def test_the_counts_line_names_the_first_ended_best_completed_trial():
    out = io.StringIO()
    console = StudyConsole(load_space("demo"), total=5, stream=out)
    ended = [_trial("a", 0.5), _trial("b", 0.9), _trial("c", 0.99, done=False),  # c: stopped
             _trial("d", 0.9), _trial("e", 0.7)]
    for n, trial in enumerate(ended):
        console.on_trial_complete(0, ended[:n + 1], trial)
    lines = out.getvalue().splitlines()
    assert "best val_accuracy 0.5000 (a)" in lines[0]
    assert all("best val_accuracy 0.9000 (b)" in line for line in lines[1:])  # a tie keeps b
    assert "5/5 finished" in lines[-1]
