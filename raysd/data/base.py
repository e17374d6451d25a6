"""What every data source shares: the table of sources, the Task each one builds, DataError.

A leaf: the loaders (images.py, text.py) import it, it imports none of them, and it needs no
torch, so anything may read SOURCES cheaply.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.data import Dataset

# Every data source raysd reads, as a user writes it, and what its examples are (Task.modality).
# A builtin set is named whole; the other kinds take a local folder (DIR), which must exist and
# which raysd.paths makes absolute.
MODALITIES = {"builtin:digits": "image", "builtin:text": "text", "imagefolder:DIR": "image",
              "jsonl:DIR": "text", "hfdisk:DIR": "text"}
SOURCES = tuple(MODALITIES)
BUILTINS = tuple(s for s in SOURCES if s.startswith("builtin:"))
FOLDER_KINDS = tuple(s.split(":")[0] for s in SOURCES if s.endswith(":DIR"))
# What a task of each modality reports on val and test (Task.metrics).
METRICS = {"image": ("accuracy",), "text": ("macro_f1", "micro_f1")}


def modality(source: str) -> str | None:
    """"image" or "text", what a source's examples are; None for a source raysd does not read."""
    return MODALITIES.get(source) or MODALITIES.get(f"{source.partition(':')[0]}:DIR")


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
    # by the loader from the listing it reads anyway, or of a builtin set's contents, which
    # differ between Python and scikit-learn releases.
    fingerprint: str = ""


def fingerprint_of(*parts: bytes) -> str:
    """A hash of a builtin set's contents, given as bytes."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def fingerprint_dir(path: Path) -> str:
    """A hash of every file's relative path, size and modification time under `path`: a changed,
    added or removed file changes it, without reading a byte of the data."""
    h = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
