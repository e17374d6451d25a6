"""A study folder on any pyarrow filesystem (local, NFS, s3://, gs://). Ray-free.

Each write replaces a whole file atomically, so readers never see a truncated file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysd.errors import ConfigError

TRIALS = "trials.parquet"
HISTORY, PARTS = "history.parquet", "history_parts"  # the history of studies before history.py
MODELS = "models"  # <study>/models/<trial id>/: a trial's fine-tuned model
# <study>/train/<trial id>/: a trial's Ray Train run (step checkpoints, Ray's own files) and,
# when it failed, its error files: <FATAL_PREFIX><rank>.txt, worker_error.txt.
TRAIN = "train"
FATAL_PREFIX = "fatal_error.rank"  # a rank's error that a retry would only repeat
TMP_MARK = ".tmp-"  # .<name>.tmp-<hex>: a local write in progress, or one a crash cut short
TRIAL_ID = "trial_id"  # a trial's config key: its raysd id, which names its folders
SPACE_FILE = "space.yaml"  # the space a study runs, overrides applied
# What `raysd ls` shows (the space name, when and by which raysd it was started) and, for
# `raysd compare`, its variants in order, so `compare --resume` can write the same table.
STUDY_FILE = "study.yaml"


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's (filesystem, path) of a local path or URI; ConfigError when pyarrow reads no
    filesystem there (an unknown scheme, a malformed URI)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as err:  # pyarrow.lib.ArrowInvalid
        if "Unrecognized filesystem type" in str(err):
            scheme = uri.partition("://")[0]
            raise ConfigError(f"{uri}: unknown storage scheme {scheme!r} (use a local path, "
                              "s3://, gs:// or another scheme pyarrow reads)") from None
        raise ConfigError(f"{uri}: {str(err).splitlines()[0]}") from None


class Store:
    """A study folder on a pyarrow filesystem: small whole-file reads and atomic writes."""

    def __init__(self, uri: str):
        self.fs, self.root = open_uri(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def read_yaml(self, *parts: str) -> dict:
        """A YAML mapping ({} when the file is absent or empty), e.g. SPACE_FILE, STUDY_FILE."""
        import yaml

        return (yaml.safe_load(self.read_text(*parts)) if self.exists(*parts) else None) or {}

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Replace a whole file: a reader sees the old or the new bytes, never half of them."""
        target = self.path(*parts)
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        if self.local:  # write beside, then rename: atomic on POSIX
            # A dot first: readers of a folder as a dataset (pyarrow, pandas) skip hidden files.
            folder, _, base = target.rpartition("/")
            tmp = f"{folder}/.{base}{TMP_MARK}{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        with self.fs.open_output_stream(target) as f:  # object stores publish on close
            f.write(data)

    def read_rows(self, *parts: str) -> list[dict]:
        if not self.exists(*parts):
            return []
        return pq.read_table(self.path(*parts), filesystem=self.fs).to_pylist()

    def write_rows(self, rows: list[dict], *parts: str) -> None:
        # from_pylist takes its columns from the first row: give every row every key.
        keys = dict.fromkeys(k for row in rows for k in row)
        table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]) if rows else pa.table({})
        # Encode the whole file first, so a failure while encoding never leaves a truncated
        # file (or object) behind.
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        self.write_bytes(buffer.getvalue().to_pybytes(), *parts)

    def list(self, *parts: str) -> list[str]:
        """Base names of the files in a folder (none when it does not exist), without the
        temporary files of writes in progress or cut short by a crash."""
        return [name for name in self._names(*parts) if TMP_MARK not in name]

    def remove_temporaries(self, *parts: str) -> None:
        """Delete what writes cut short by a crash left in a folder; only its one writer may."""
        for name in self._names(*parts):
            if TMP_MARK in name:
                self.delete(*parts, name)

    def _names(self, *parts: str) -> list[str]:
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete(self, *parts: str) -> None:
        self.fs.delete_file(self.path(*parts))

    def delete_dir(self, *parts: str) -> None:
        self.fs.delete_dir(self.path(*parts))

    def upload(self, local_dir: Path, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)
        pafs.copy_files(str(local_dir), self.path(*parts), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
