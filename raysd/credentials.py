"""Passwords in URLs (an Optuna RDB URL such as postgresql://user:secret@host/db) never reach a
file, a console line, a log or a tracker: raysd writes and prints `redact(text)`.

A space holds `conceal(url)`, the URL with its password replaced by ***, so nothing built from
the space (space.yaml, Tune's pickles, errors) can hold it; `reveal` gives the URL back to the
one place that connects. In a later process (`--resume`, `report`) the password comes from the
environment: `env:NAME` names the variable that holds the whole URL (so it stays out of the
command line and `ray job list` too); a URL given with its password must be in RAYSD_OPTUNA_STORAGE.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from raysd.errors import ConfigError

ENV = "env:"  # `env:NAME`: the URL is in the environment variable NAME
STORAGE_VARIABLE = "RAYSD_OPTUNA_STORAGE"  # a concealed URL's full form, in a later process
MASK = "***"
# scheme://user:password@ -> scheme://user:***@ (a user name alone, or none, stays as it is)
_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)@")
_known: dict[str, str] = {}  # concealed URL -> the URL, for this process only


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def redact_values(value: Any) -> Any:
    """A YAML/JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def conceal(url: str | None) -> str | None:
    """The form a space holds: `env:NAME` as it is, a URL without its password (remembered)."""
    if not url or url.startswith(ENV):
        return url
    concealed = redact(url)
    if concealed != url:
        _known[concealed] = url
    return concealed


def reveal(value: str, flag: str = "--optuna-storage") -> str:
    """The URL a concealed value stands for; ConfigError (one line) when this process cannot know it."""
    if value.startswith(ENV):
        name = value[len(ENV):]
        if not os.environ.get(name):
            raise ConfigError(f"{flag} {value}: the environment variable {name} is not set "
                              "(it holds the storage URL, which raysd never writes down)")
        return os.environ[name]
    if value in _known:
        return _known[value]
    if f":{MASK}@" not in value:  # it had no password
        return value
    full = os.environ.get(STORAGE_VARIABLE, "")
    if redact(full) != value:
        raise ConfigError(f"{flag} {value}: raysd keeps no password; set {STORAGE_VARIABLE} to this "
                          "URL with its password" + (" (it holds another URL)" if full else ""))
    return full


def redact_logs() -> None:
    """Every log record this process creates from now on (Optuna's, SQLAlchemy's, Ray's,
    raysd's) carries its message redacted."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record stays as logging would show it
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    redacting.redacts = True
    logging.setLogRecordFactory(redacting)
