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
              max_length: int = 128, augment: str = "none", val_fraction: float = 0.1,
              image_resize: str = "crop") -> Task:
    """Resolve a data source string; ConfigError names the source when it cannot be used.

    `augment` is the fine-tuning view's augmentation of images (config.AUGMENTS);
    `val_fraction` of train is held out for validation where the source has no val split
    (0: none, and val is empty); `image_resize` (config.RESIZES) fits image folders to size."""
    if source == "builtin:digits":
        from raysd.data.images import digits_task

        return digits_task(image_size or 32, augment)
    if source == "builtin:text":
        from raysd.data.text import builtin_text_task

        return builtin_text_task(tokenizer, max_length)
    kind, path = _folder(source)
    if kind == "imagefolder":
        from raysd.data.images import imagefolder_task

        return imagefolder_task(path, image_size or 224, source, augment, val_fraction, image_resize)
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


def check_source(source: str, min_train: int, val_fraction: float = 0.1, selects: bool = False) -> None:
    """What can be known of a data source without decoding it, before Ray starts: it exists,
    every split has the same classes (at least 2), train holds at least `min_train` examples
    (the largest global batch), and a study that `selects` has a validation split to select
    on. ConfigError names the file, line or folder."""
    if source in BUILTINS:
        return
    kind, path = _folder(source)
    if kind == "hfdisk":
        return  # the splits are read by `datasets` in the worker
    if kind == "imagefolder":
        from raysd.data.images import scan_imagefolder

        if selects and val_fraction == 0 and not (path / "val").is_dir():
            raise ConfigError(f"data {source!r}: evaluation.val_fraction is 0 and {path / 'val'} does "
                              "not exist: a search selects on validation; add val/ or set "
                              "evaluation.val_fraction > 0")
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
