"""Where a study's Optuna trials live: --optuna-storage URL, checked before Ray starts."""
from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from raysd import cli, optuna_study
from raysd.errors import ConfigError
from raysd.spaces import load_space


def test_an_rdb_storage_receives_the_searchers_trials(tmp_path):
    """The searcher the study runs writes its trials to the RDB under the study's name."""
    from raysd.study import _searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load_space("demo", {"study.optuna_storage": url})
    searcher = _searcher(space, str(tmp_path / "mystudy"), finished={})
    config = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {**config, "val_accuracy": 0.75})
    loaded = optuna.load_study(study_name="mystudy", storage=url)
    assert [t.value for t in loaded.trials] == [0.75]
    assert loaded.trials[0].params["mask_ratio"] == config["mask_ratio"]
    assert optuna_study.load(str(tmp_path / "mystudy"), url).trials[0].value == 0.75


def test_a_name_taken_in_the_rdb_or_a_bad_url_is_one_line_exit_2(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="taken", storage=url)
    argv = ["tune", "--space", "demo", "--storage", str(tmp_path / "s"), "--name", "taken"]
    assert cli.main([*argv, "--optuna-storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a study named 'taken'" in err
    assert cli.main([*argv, "--optuna-storage", "nosuchdb://x"]) == 2
    assert "--optuna-storage nosuchdb://x" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing written


def test_a_password_in_a_url_is_never_printed(tmp_path, capsys, monkeypatch):
    """Ray-free: an RDB that cannot be opened is one line naming the URL without its password;
    so is a missing env:NAME, and `--resume` of a study whose variable is gone."""
    secret = "s3cr3t-pw"
    argv = ["tune", "--space", "demo", "--storage", str(tmp_path / "s"), "--name", "x"]
    assert cli.main([*argv, "--optuna-storage", f"postgresql+psycopg2://u:{secret}@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and secret not in err and "postgresql+psycopg2://u:***@127.0.0.1:1/db" in err
    monkeypatch.delenv("RAYSD_NO_SUCH_URL", raising=False)
    assert cli.main([*argv, "--optuna-storage", "env:RAYSD_NO_SUCH_URL"]) == 2
    assert "environment variable RAYSD_NO_SUCH_URL is not set" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing written


def _postgres_bin() -> Path | None:
    """PostgreSQL's server binaries: pgserver's wheel (the test extra; found, not imported, as
    its import sets up a server manager we do not use), else a system install."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    found = [Path(spec.origin).parent / "pginstall" / "bin" / "initdb"] if spec else []
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return next((path.parent for path in found if path.exists()), None)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server for this module: password auth, 127.0.0.1 on a free port, data in
    a temporary folder, ended by its pid. (the URL with its password, the password)"""
    import secrets
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    from helpers import free_port

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL: pip install -e '.[test]' (pgserver) or apt install postgresql")
    import psycopg2

    folder = Path(tempfile.mkdtemp(prefix="rpg", dir="/tmp"))  # short: a socket lives here
    as_user = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    password = f"pw{secrets.token_hex(12)}"
    (folder / "pw").write_text(password)
    if as_user:
        os.chown(folder / "pw", as_user["user"], as_user["group"])
    subprocess.run([bin_dir / "initdb", "-D", folder / "db", "-U", "raysd", "--pwfile", folder / "pw",
                    "--auth=scram-sha-256", "-E", "UTF8"], check=True, capture_output=True, **as_user)
    (folder / "pw").unlink()
    port = free_port()
    server = subprocess.Popen([bin_dir / "postgres", "-D", folder / "db", "-h", "127.0.0.1",
                               "-p", str(port), "-k", folder], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, **as_user)
    url = f"postgresql://raysd:{password}@127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            connection = psycopg2.connect(f"{url}/postgres")
            break
        except psycopg2.OperationalError:
            if time.time() > deadline or server.poll() is not None:
                raise
            time.sleep(0.3)
    connection.autocommit = True
    connection.cursor().execute("CREATE DATABASE optuna")
    connection.close()
    # SQLAlchemy 2.1 takes psycopg (3) for a bare postgresql://; the test extra has psycopg2.
    yield f"{url.replace('postgresql://', 'postgresql+psycopg2://')}/optuna", password
    server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
    server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_postgres_url_is_concealed_and_revealed_from_the_environment(postgres, monkeypatch):
    """Ray-free: the space holds the URL without its password; the storage connects, and its
    pickle (Tune saves the searcher's study in the study folder) holds no password either."""
    import pickle

    from raysd import credentials

    url, password = postgres
    space = load_space("demo", {"study.optuna_storage": url})
    assert password not in repr(space) and space.study.optuna_storage == credentials.redact(url)
    storage = optuna_study.storage("/tmp/x/s1", space.study.optuna_storage)
    optuna.create_study(study_name="s1", storage=storage)
    state = pickle.dumps(storage)
    assert password.encode() not in state
    monkeypatch.setattr(credentials, "_known", {})  # a later process knows no password
    with pytest.raises(ConfigError, match="set RAYSD_OPTUNA_STORAGE"):
        pickle.loads(state)
    monkeypatch.setenv("RAYSD_OPTUNA_STORAGE", url)
    assert optuna.get_all_study_names(pickle.loads(state)) == ["s1"]
    monkeypatch.setenv("RAYSD_TEST_PG", url)
    assert optuna.get_all_study_names(optuna_study.storage("/tmp/x/s2", "env:RAYSD_TEST_PG")) == ["s1"]


def test_a_study_in_postgres_writes_and_prints_no_password(postgres, ray_local, tmp_path, capsys,
                                                           monkeypatch):
    """A tiny search with its Optuna study in PostgreSQL, then --resume in a process that knows no
    password: it needs the URL in the environment again, and finds the study there."""
    from helpers import TINY
    from raysd import credentials

    url, password = postgres
    argv = ["tune", "--space", "demo", *TINY, "--num-samples", "1", "--storage", str(tmp_path),
            "--name", "pg"]
    assert cli.main([*argv, "--optuna-storage", url]) == 0
    monkeypatch.setattr(credentials, "_known", {})  # as in a new process
    monkeypatch.delenv("RAYSD_OPTUNA_STORAGE", raising=False)
    assert cli.main(["tune", "--resume", str(tmp_path / "pg")]) == 2  # before Ray: one line
    assert "set RAYSD_OPTUNA_STORAGE" in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setenv("RAYSD_OPTUNA_STORAGE", url)
    assert cli.main(["tune", "--resume", str(tmp_path / "pg")]) == 0
    out = capsys.readouterr()
    trials = optuna.load_study(study_name="pg", storage=url).trials
    chains = [t for t in trials if "raysd_point" not in t.user_attrs]
    assert len(chains) == 1 and chains[0].value is not None  # the searcher's trial, in PostgreSQL
    assert len(trials) == 4  # and its chain's three points
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert leaked == []
    assert password not in out.out + out.err
    assert "raysd:***@127.0.0.1" in (tmp_path / "pg" / "space.yaml").read_text()


def _journal_snapshots(where: Path) -> tuple[bytes, bytes]:
    """An Optuna journal's bytes after one finished trial and after three."""
    from optuna.storages.journal import JournalFileBackend

    path = where / "j"
    study = optuna.create_study(study_name="j", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(path))))
    snapshots = []
    for value in range(3):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
        snapshots.append(path.read_bytes())
    return snapshots[0], snapshots[-1]


def test_a_remote_journal_never_replaces_a_longer_local_one(tmp_path):
    """Ray-free, a file:// study folder standing for s3:// or gs://: the driver that stopped
    before its last upload left the longer journal on its disk; --resume and report keep it,
    and the final push completes the study folder's copy."""
    study_uri = f"file://{tmp_path}/storage/s"
    (tmp_path / "storage" / "s").mkdir(parents=True)
    short, long = _journal_snapshots(tmp_path)
    assert long.startswith(short)  # a journal only grows
    remote, local = tmp_path / "storage" / "s" / optuna_study.JOURNAL, optuna_study.journal_path(study_uri)
    remote.write_bytes(short)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(long)
    optuna_study.fetch_journal(study_uri)
    assert local.read_bytes() == long
    optuna_study.push_journal(study_uri)
    assert remote.read_bytes() == long
    local.write_bytes(short)  # a stale copy on this machine: the study folder's wins
    optuna_study.push_journal(study_uri)
    assert remote.read_bytes() == long
    optuna_study.fetch_journal(study_uri)
    assert local.read_bytes() == long
    local.write_bytes(long[:len(short)] + b"X" * 40)  # neither holds the other: refused, untouched
    with pytest.raises(ConfigError, match="differ"):
        optuna_study.fetch_journal(study_uri)
    assert remote.read_bytes() == long


def test_the_mirror_uploads_records_appended_within_one_clock_tick(tmp_path):
    """The journal's last records grow the file without moving its mtime (a coarse clock tick):
    they are uploaded all the same."""
    from raysd.storage import Store
    from raysd.writers import FileMirror

    local = tmp_path / "optuna.journal"
    local.write_bytes(b'{"op_code": 0}\n')
    mirror = FileMirror(Store(str(tmp_path / "study")), {str(local): optuna_study.JOURNAL})
    mirror.sync()
    stamp = local.stat().st_mtime_ns
    with open(local, "ab") as f:
        f.write(b'{"op_code": 6}\n')
    os.utime(local, ns=(stamp, stamp))
    mirror.sync()
    assert (tmp_path / "study" / optuna_study.JOURNAL).read_bytes() == local.read_bytes()
