"""Target tasks from a data source string; the sources are listed once, in base.SOURCES."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from raysd.data.base import BUILTINS, FOLDER_KINDS, SOURCES, DataError, Task
from raysd.errors import ConfigError

__all__ = ["SOURCES", "DataError", "Task", "check_source", "load_task"]

# The loaders (images.py, text.py) import torch and numpy: they are imported where a source
# needs them, so `raysd.data` and its table of sources stay cheap to import.


def load_task(source: str, *, image_size: int | None = None, tokenizer: Any = None,
              max_length: int = 128, augment: str = "none", val_fraction: float = 0.1) -> Task:
    """Resolve a data source string; ConfigError names the source when it cannot be used.

    `augment` is the fine-tuning view's augmentation of images (config.AUGMENTS);
    `val_fraction` of train is held out for validation where the source has no val split."""
    if source == "builtin:digits":
        from raysd.data.images import digits_task

        return digits_task(image_size or 32, augment)
    if source == "builtin:text":
        from raysd.data.text import builtin_text_task

        return builtin_text_task(tokenizer, max_length)
    kind, path = _folder(source)
    if kind == "imagefolder":
        from raysd.data.images import imagefolder_task

        return imagefolder_task(path, image_size or 224, source, augment, val_fraction)
    from raysd.data.text import hfdisk_task, jsonl_task

    loader = jsonl_task if kind == "jsonl" else hfdisk_task
    return loader(path, tokenizer, max_length, source)


def _folder(source: str) -> tuple[str, Path]:
    """(kind, existing folder) of a DIR source; ConfigError for anything else."""
    kind, _, arg = source.partition(":")
    if kind == "builtin":
        raise ConfigError(f"data {source!r}: unknown builtin set ({', '.join(BUILTINS)})")
    if kind not in FOLDER_KINDS:
        raise ConfigError(f"data {source!r}: unknown source (use {', '.join(SOURCES)})")
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data {source!r}: directory {path} does not exist")
    return kind, path


def check_source(source: str, min_train: int, val_fraction: float = 0.1) -> None:
    """What can be known of a data source without decoding it, before Ray starts: it exists,
    every split has the same classes (at least 2), and train holds at least `min_train`
    examples (the largest global batch). ConfigError names the file, line or folder."""
    if source in BUILTINS:
        return
    kind, path = _folder(source)
    if kind == "hfdisk":
        return  # the splits are read by `datasets` in the worker
    if kind == "imagefolder":
        from raysd.data.images import scan_imagefolder

        train_size, num_classes = scan_imagefolder(path, source, val_fraction)
    else:
        from raysd.data.text import scan_jsonl

        train_size, num_classes = scan_jsonl(path, source)
    if num_classes < 2:
        raise ConfigError(f"data {source!r}: train has {num_classes} class; a classification task "
                          "needs at least 2")
    if train_size < min_train:
        raise ConfigError(f"data {source!r}: train has {train_size} examples, fewer than the global "
                          f"batch of {min_train}")
