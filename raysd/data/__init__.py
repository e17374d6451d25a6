"""Target tasks: `builtin:digits`, `builtin:text`, `imagefolder:DIR`, `jsonl:DIR`, `hfdisk:DIR`."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from raysd.errors import ConfigError


class DataError(RuntimeError):
    """An example that cannot be read (a corrupt image): found when a worker loads the task
    (image folders are decoded into the node's cache then), not before Ray starts."""


@dataclasses.dataclass
class Task:
    """A labelled target task; `unlabelled` is D_u (train without labels or augmentation)."""

    source: str
    modality: str  # "image" | "text"
    num_classes: int
    train: Dataset  # fine-tuning view of D_tr (augmented where the source augments)
    unlabelled: Dataset  # D_u: the same examples, un-augmented
    val: Dataset
    test: Dataset
    metrics: tuple[str, ...]  # reported on val and test; the first is the headline
    labels: tuple[str, ...] | None = None  # class names by index, where the source names them
    # What identifies the data beyond `source` (artifact keys): a hash of a folder's files, taken
    # by the loader from the listing it reads anyway; "" for builtin sets.
    fingerprint: str = ""


def load_task(source: str, *, image_size: int | None = None, tokenizer: Any = None,
              max_length: int = 128, augment: str = "none", val_fraction: float = 0.1) -> Task:
    """Resolve a data source string; ConfigError names the source when it cannot be used.

    `augment` is the fine-tuning view's augmentation of images (config.AUGMENTS);
    `val_fraction` of train is held out for validation where the source has no val split."""
    kind, _, arg = source.partition(":")
    if kind == "builtin" and arg == "digits":
        from raysd.data.images import digits_task

        return digits_task(image_size or 32, augment)
    if kind == "builtin" and arg == "text":
        from raysd.data.text import builtin_text_task

        return builtin_text_task(tokenizer, max_length)
    if kind in ("imagefolder", "jsonl", "hfdisk"):
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data {source!r}: directory {path} does not exist")
        if kind == "imagefolder":
            from raysd.data.images import imagefolder_task

            return imagefolder_task(path, image_size or 224, source, augment, val_fraction)
        from raysd.data.text import hfdisk_task, jsonl_task

        loader = jsonl_task if kind == "jsonl" else hfdisk_task
        return loader(path, tokenizer, max_length, source)
    raise _unknown(source)


def fingerprint_dir(path: Path) -> str:
    """A hash of every file's relative path, size and modification time under `path`: a changed,
    added or removed file changes it, without reading a byte of the data."""
    h = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _unknown(source: str) -> ConfigError:
    return ConfigError(f"data {source!r}: unknown source (use builtin:digits, builtin:text, "
                       "imagefolder:DIR, jsonl:DIR or hfdisk:DIR)")


def check_source(source: str, min_train: int, val_fraction: float = 0.1) -> None:
    """What can be known of a data source without decoding it, before Ray starts: it exists,
    every split has the same classes (at least 2), and train holds at least `min_train`
    examples (the largest global batch). ConfigError names the file, line or folder."""
    kind, _, arg = source.partition(":")
    if kind == "builtin":
        if arg not in ("digits", "text"):
            raise ConfigError(f"data {source!r}: unknown builtin set (builtin:digits, builtin:text)")
        return
    if kind not in ("imagefolder", "jsonl", "hfdisk"):
        raise _unknown(source)
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data {source!r}: directory {path} does not exist")
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
