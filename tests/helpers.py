"""Helpers for tests that start processes: tiny study flags, and ending exactly what we started."""
from __future__ import annotations

import os
import signal
from pathlib import Path

TINY = [
    "--set", "weights=none",
    "--set", "further_pretrain.steps=4", "--set", "further_pretrain.batch_size=16",
    "--set", "self_distill.steps=4", "--set", "self_distill.batch_size=16",
    "--set", "finetune.steps=8", "--set", "finetune.batch_size=16", "--set", "finetune.warmup_steps=2",
    "--set", "evaluation.every=4", "--set", "logging.log_every=2", "--set", "logging.checkpoint_every=2",
]


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line or environment mentions `marker` (our temp dir)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in text:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
