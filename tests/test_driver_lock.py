"""One study, one driver: the lock a driver holds, freed however the driver ends, and names
that do not collide."""
import json
import subprocess
import sys
import time

import pytest

from raysd import cli, driver_lock
from raysd.driver_lock import LOCK_FILE, DriverLock
from raysd.errors import ConfigError

HOLD = "import sys, time; from raysd.driver_lock import DriverLock; DriverLock(sys.argv[1]).__enter__(); " \
       "print('held', flush=True); time.sleep(120)"


def test_a_crashed_drivers_lock_never_blocks_the_study(tmp_path):
    study = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(study)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}\\): one study, one driver"):
            DriverLock(str(study)).__enter__()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    assert (study / LOCK_FILE).exists()  # left behind, and yet:
    with DriverLock(str(study)):
        assert json.loads((study / LOCK_FILE).read_text())["pid"] != holder.pid
    assert not (study / LOCK_FILE).exists()  # released with the driver that held it


def test_default_study_names_differ_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *_: "20261130-120000")
    args = cli.build_parser().parse_args(["run", "--space", "demo", "--storage", str(tmp_path)])
    first, second = (cli._prepare(args, single=True)[1] for _ in range(2))
    assert first != second and first.startswith(f"{tmp_path}/demo-20261130-120000-")


@pytest.fixture
def s3(moto_s3, monkeypatch):
    for key, value in moto_s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(driver_lock, "SETTLE_S", 0.0)
    monkeypatch.setattr(driver_lock, "RENEW_S", 0.2)
    return "s3://raysd"


def test_on_object_storage_a_heartbeat_refuses_a_live_driver_and_yields_to_a_stale_one(s3):
    study = f"{s3}/lock-test"
    with DriverLock(study) as held:
        first = json.loads(held.store.read_text(LOCK_FILE))["renewed"]
        time.sleep(0.6)
        assert json.loads(held.store.read_text(LOCK_FILE))["renewed"] > first  # renewed
        with pytest.raises(ConfigError, match="being run by another driver .*lock renewed 0 s ago"):
            DriverLock(study).__enter__()
    assert not held.store.exists(LOCK_FILE)
    crashed = {"host": "gone", "pid": 1, "token": "x", "renewed": time.time() - driver_lock.STALE_S - 1}
    held.store.write_text(json.dumps(crashed), LOCK_FILE)
    with DriverLock(study) as taken:
        assert json.loads(taken.store.read_text(LOCK_FILE))["token"] == taken.me["token"]
