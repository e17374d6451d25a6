"""Paths mean what the user typed: every relative path a user can give (flags, `--set`, a
space file) is made absolute against the driver's working directory, once, before Ray changes
the working directory of trials and jobs (and before the CLI itself leaves it). Ray-free."""
from __future__ import annotations

import re
from pathlib import Path

from raysd.data.base import FOLDER_KINDS

# An SQLAlchemy SQLite URL with a relative file: sqlite:///rel.db (four slashes are absolute).
_SQLITE_RELATIVE = re.compile(r"^(sqlite(?:\+\w+)?):///(?!/)([^?]+)(\?.*)?$")


def artifacts_uri(setting: str | None, study_uri: str) -> str | None:
    """Where a study's trials share stage outputs, from study.artifacts (None: reuse is off)."""
    if setting is None:
        return f"{study_uri}/artifacts"
    return None if setting.lower() == "none" else setting


def absolute_uri(value: str) -> str:
    """A local path made absolute; a URI (s3://, gs://, file://) as given."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


def absolute_data(value: str) -> str:
    """`imagefolder:rel/dir` -> `imagefolder:/abs/rel/dir`; builtin sets as given."""
    kind, sep, arg = value.partition(":")
    if sep and kind in FOLDER_KINDS and "://" not in arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    return value


def absolute_weights(value: str) -> str:
    """A weights folder (`dir` or `hf:dir`) made absolute; hub ids, timm names, builtin:demo
    and none as given. `hf:X` is a folder when X is one here: from_pretrained looks there first."""
    if value.startswith("hf:"):
        name, at, revision = value[3:].partition("@")
        folder = Path(name).expanduser()
        return f"hf:{folder.resolve()}{at}{revision}" if folder.is_dir() else value
    if value in ("", "none") or value.startswith(("builtin:", "timm:")):
        return value
    return str(Path(value).expanduser().resolve())


def absolute_rdb_url(url: str) -> str:
    """`sqlite:///optuna.db` -> `sqlite:////abs/optuna.db`; other RDB URLs as given."""
    match = _SQLITE_RELATIVE.match(url)
    if not match or match.group(2) == ":memory:":
        return url
    scheme, path, query = match.groups()
    return f"{scheme}:///{Path(path).expanduser().resolve()}{query or ''}"


_SETTINGS = {"weights": absolute_weights, "data": absolute_data}


def absolute_doc(doc: dict) -> None:
    """Make every path of a space document absolute, in place: `weights` and `data` (and their
    searched choices), `study.artifacts` and a SQLite `study.optuna_storage`."""
    for key, absolute in _SETTINGS.items():
        if isinstance(doc.get(key), str):
            doc[key] = absolute(doc[key])
        param = (doc.get("search") or {}).get(key) if isinstance(doc.get("search"), dict) else None
        if isinstance(param, dict) and isinstance(param.get("choices"), list):
            param["choices"] = [absolute(c) if isinstance(c, str) else c for c in param["choices"]]
    study = doc.get("study")
    if not isinstance(study, dict):
        return
    artifacts = study.get("artifacts")
    if isinstance(artifacts, str) and artifacts and artifacts.lower() != "none":
        study["artifacts"] = absolute_uri(artifacts).rstrip("/")
    if isinstance(study.get("optuna_storage"), str):
        study["optuna_storage"] = absolute_rdb_url(study["optuna_storage"])
