"""Where a study's Optuna trials live, so that Optuna's own tools open a raysd study.

By default a journal file, `<study>/optuna.journal`, written while the study runs:

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("raysd_results/<study>/optuna.journal"))
    optuna.load_study(study_name="<study>", storage=storage)
    # or: optuna-dashboard raysd_results/<study>/optuna.journal

With `--optuna-storage URL` (an RDB URL such as sqlite:///optuna.db or postgresql://...) the
study is there instead, under the raysd study's name. On s3:// or gs:// storage the journal is
written on the driver's disk and mirrored to the study folder as it changes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from raysd.cache import cache_root
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


def storage(study_uri: str, url: str | None):
    """The Optuna storage object of a study (its journal when `url` is None)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds; all mean "cannot open"
            raise ConfigError(f"--optuna-storage {url}: {str(err).strip().splitlines()[0]}") from None
    path = journal_path(study_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def fetch_journal(study_uri: str) -> None:
    """For a remote study, bring its journal to the local mirror path (resume, report)."""
    if "://" not in study_uri:
        return
    from raysd.storage import Store

    store = Store(study_uri)
    if store.exists(JOURNAL):
        path = journal_path(study_uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.read_bytes(JOURNAL))


def check_new(study_uri: str, url: str | None) -> None:
    """A new study must not land in an Optuna study of the same name (a shared RDB)."""
    import optuna

    names = optuna.study.get_all_study_names(storage(study_uri, url)) if url else []
    if study_name(study_uri) in names:
        raise ConfigError(f"--optuna-storage {url} already holds a study named "
                          f"{study_name(study_uri)!r}: use another --name")


def load(study_uri: str, url: str | None):
    """The study's Optuna study, or None when it has none (raysd run, raysd compare)."""
    import optuna

    fetch_journal(study_uri)
    if not url and not journal_path(study_uri).exists():
        return None
    try:
        return optuna.load_study(study_name=study_name(study_uri), storage=storage(study_uri, url))
    except KeyError:  # no study of that name in the storage
        return None
