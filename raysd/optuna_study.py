"""Where a study's Optuna trials live, so that Optuna's own tools open a raysd study.

By default a journal file, `<study>/optuna.journal`, written while the study runs:

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("raysd_results/<study>/optuna.journal"))
    optuna.load_study(study_name="<study>", storage=storage)
    # or: optuna-dashboard raysd_results/<study>/optuna.journal

With `--optuna-storage URL` (an RDB URL such as sqlite:///optuna.db or postgresql://...) the
study is there instead, under the raysd study's name; `--optuna-storage env:NAME` reads the URL
from the environment variable NAME. A URL's password is never written (credentials.py).

On s3:// or gs:// storage the journal is written on the driver's disk, mirrored to the study
folder as it grows and once more before the command returns (push_journal), and fetched back for
--resume and report (fetch_journal). A journal only grows: neither ever replaces a journal with
a shorter one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import optuna

from raysd.cache import cache_root
from raysd.credentials import redact, reveal
from raysd.errors import ConfigError

JOURNAL = "optuna.journal"


def study_name(study_uri: str) -> str:
    return study_uri.rstrip("/").rsplit("/", 1)[-1]


def journal_path(study_uri: str) -> Path:
    """The journal file the driver writes: in the study folder, or a local mirror of a remote one."""
    if "://" not in study_uri:
        return Path(study_uri) / JOURNAL
    digest = hashlib.sha256(study_uri.encode()).hexdigest()[:16]
    return cache_root() / "optuna" / digest / JOURNAL


class ConcealedRDBStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose pickle holds the space's concealed URL (Tune pickles the Tuner, with
    the searcher and its study, into the study folder; raysd never loads it), and whose copies
    reveal it again."""

    def __init__(self, concealed: str):
        self.concealed = concealed
        super().__init__(reveal(concealed))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "url": self.concealed}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "url": reveal(state["concealed"])})


def storage(study_uri: str, url: str | None):
    """The Optuna storage object of a study (its journal when `url`, the space's concealed
    form of the RDB URL, is None)."""
    from optuna.storages.journal import JournalFileBackend

    if url:
        try:
            return ConcealedRDBStorage(url)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds; all mean "cannot open"
            raise ConfigError(f"--optuna-storage {url}: {redact(str(err).strip().splitlines()[0])}") from None
    path = journal_path(study_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _newer(candidate: bytes, current: bytes, what: str) -> bool:
    """Whether `candidate` extends `current` (an append-only journal); ConfigError when neither
    holds the other, as after two drivers wrote one study."""
    if current.startswith(candidate):
        return False
    if candidate.startswith(current):
        return True
    raise ConfigError(f"{what}: the study folder's Optuna journal and this machine's copy differ "
                      "(two drivers wrote this study?); move one away and retry")


def fetch_journal(study_uri: str) -> None:
    """For a remote study, bring its journal to the local mirror path (resume, report), unless
    the local copy already holds it: a driver stopped before its last upload left it longer."""
    if "://" not in study_uri:
        return
    from raysd.storage import Store

    store = Store(study_uri)
    if store.exists(JOURNAL):
        path = journal_path(study_uri)
        remote = store.read_bytes(JOURNAL)
        if _newer(remote, path.read_bytes() if path.exists() else b"", f"{study_uri}/{JOURNAL}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Store(str(path.parent)).write_bytes(remote, path.name)  # atomic: Optuna may read it


def push_journal(study_uri: str) -> None:
    """For a remote study, upload the local journal unless the study folder's copy holds it."""
    path = journal_path(study_uri)
    if "://" not in study_uri or not path.exists():
        return
    from raysd.storage import Store

    store = Store(study_uri)
    local = path.read_bytes()
    remote = store.read_bytes(JOURNAL) if store.exists(JOURNAL) else b""
    if _newer(local, remote, f"{study_uri}/{JOURNAL}"):
        store.write_bytes(local, JOURNAL)


def check_new(study_uri: str, url: str | None) -> None:
    """A new study must not land in an Optuna study of the same name (a shared RDB)."""
    names = optuna.study.get_all_study_names(storage(study_uri, url)) if url else []
    if study_name(study_uri) in names:
        raise ConfigError(f"--optuna-storage {url} already holds a study named "
                          f"{study_name(study_uri)!r}: use another --name")


def load(study_uri: str, url: str | None):
    """The study's Optuna study, or None when it has none (raysd run, raysd compare)."""
    fetch_journal(study_uri)
    if not url and not journal_path(study_uri).exists():
        return None
    try:
        return optuna.load_study(study_name=study_name(study_uri), storage=storage(study_uri, url))
    except KeyError:  # no study of that name in the storage
        return None
