"""The checks that read files before Ray starts: every trial's weights and data, a text
model's values against its tokenizer and positions, and the folders a study will write."""
from __future__ import annotations

import os
from pathlib import Path

from raysd import models
from raysd.config import FAMILY_MODALITY, MODEL_FAMILIES, TrialConfig
from raysd.errors import ConfigError
from raysd.spaces import Space, extremes


def check_inputs(space: Space) -> None:
    """The weights and data of every trial the space can run, and the space's values against
    its model, checked before Ray starts."""
    from raysd.data import check_source
    from raysd.models.weights import check_weights

    trials = [(space.source, space.trial_config())]
    for param in space.params:
        if param.key in ("model", "weights", "data"):
            values = list(param.choices)
        elif param.key == "max_length":
            values = [max(extremes(param))]  # the longest text is the one that can overflow
        else:
            continue
        trials += [(f"{space.source}: search.{param.key} = {value!r}",
                    space.trial_config({param.key: value})) for value in values]
    for where, cfg in trials:
        check_modality(cfg, where)
        check_weights(cfg.model, cfg.weights)
        check_model_fit(cfg, where)
        batches = [getattr(cfg, stage).batch_size for stage, _ in cfg.stages()]
        check_source(cfg.data, min_train=max(batches), val_fraction=cfg.evaluation.val_fraction,
                     selects=bool(space.params))


# What each model family reads, in data.base.MODALITIES' words.
_WORDS = {"image": "images", "text": "text"}


def check_modality(cfg: TrialConfig, where: str) -> None:
    """An image model given text, or a text model given images, would build its weights and
    fail in every worker: refused here."""
    from raysd.data.base import modality

    reads, given = FAMILY_MODALITY.get(MODEL_FAMILIES[cfg.model]), modality(cfg.data)
    if reads and given and reads != given:
        raise ConfigError(f"{where}: model {cfg.model} reads {_WORDS[reads]}; data {cfg.data!r} is "
                          f"{_WORDS[given]}")


def check_model_fit(cfg: TrialConfig, where: str) -> None:
    """A text model against the values it is given: `max_length` within its positions, and
    a tokenizer that fits its vocabulary. A local checkpoint's config and tokenizer are read
    here, as a worker would read them; a hub checkpoint's are checked when a worker downloads
    them; the demo's are built to fit (tests/test_text_demo.py)."""
    if MODEL_FAMILIES[cfg.model] != "roberta":
        return
    import torch
    from transformers import RobertaConfig

    from raysd.models.roberta import architecture_differences

    with torch.device("meta"):  # shapes and config only: no memory, no init
        backbone = models.build(cfg.model)
    if cfg.max_length > backbone.max_length:
        raise ConfigError(f"{where}: max_length: must be at most {backbone.max_length}, the positions "
                          f"of {cfg.model} (got {cfg.max_length!r})")
    if cfg.weights in ("", "none") and backbone.tokenizer is None:
        raise ConfigError(f"{where}: weights: none leaves {cfg.model} without a tokenizer; "
                          "give weights hf:ID or a saved directory")
    local = _local_weights(cfg.weights)
    if local is None:
        return
    if (local / "config.json").is_file():  # a transformers checkpoint (raysd's own: check_weights)
        differ = architecture_differences(RobertaConfig.from_json_file(str(local / "config.json")),
                                          backbone.config)
        if differ:
            raise ConfigError(f"weights {cfg.weights!r}: do not fit {cfg.model} "
                              f"({', '.join(differ)})")
    backbone.load_tokenizer(str(local))  # <pad> id, a <mask>, no more tokens than the vocabulary


def _local_weights(weights: str) -> Path | None:
    """The folder a weights source reads (a directory, or hf:DIR), else None."""
    if weights.startswith("hf:"):
        weights = weights[3:].partition("@")[0]
    elif weights in ("", "none") or weights.startswith(("builtin:", "timm:")):
        return None
    path = Path(weights).expanduser()
    return path if path.is_dir() else None


def check_storage(storage: str, flag: str = "--storage") -> None:
    """A local folder a study writes (--storage, --artifacts) must be, or be creatable as, a
    writable folder; a URI must name a filesystem pyarrow reads."""
    if "://" in storage:
        import pyarrow.fs as pafs

        try:
            pafs.FileSystem.from_uri(storage)
        except (ValueError, OSError) as err:
            raise ConfigError(f"{flag} {storage}: {str(err).splitlines()[0]}") from None
        return
    path = Path(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {storage}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {storage}: {existing} is not writable")


def check_artifacts(artifacts: str | None, study_uri: str) -> None:
    """Where trials share stage outputs (study.artifacts; by default <study>/artifacts) must work
    before any trial starts: a folder under a file, or an object store without the client library
    its leases need (raysd.leases), would fail every trial, one after another."""
    from raysd.paths import artifacts_uri

    uri = artifacts_uri(artifacts, study_uri)
    if uri is None:
        return
    check_storage(uri, "--artifacts")
    if "://" in uri:
        from raysd.leases import require_client

        require_client(uri)


def check_loggers(loggers, storage: str) -> None:
    """--logger needs its package, and MLflow a tracking URI when the study is not local."""
    import importlib.util

    for logger in loggers:
        if importlib.util.find_spec(logger) is None:
            raise ConfigError(f"--logger {logger}: the {logger} package is not installed "
                              f"(pip install 'raysd[trackers]')")
    if "mlflow" in loggers and "://" in storage and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(f"--logger mlflow: set MLFLOW_TRACKING_URI (a tracking server or "
                          f"database); the default, SQLite in the study folder, needs a local --storage, "
                          f"not {storage}")
