"""Ray's W&B logger callback, with one W&B run per raysd trial id (resume.py)."""
from __future__ import annotations

from ray.air.integrations.wandb import WandbLoggerCallback

from raysd.resume import TRIAL_ID


class StudyWandb(WandbLoggerCallback):
    """WandbLoggerCallback whose run id is the trial's raysd id, not Tune's (which a trial run
    again by --resume does not keep)."""

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs) -> None:
        super()._start_logging_actor(trial, exclude_results,
                                     **{**wandb_init_kwargs, "id": trial.config[TRIAL_ID]})
