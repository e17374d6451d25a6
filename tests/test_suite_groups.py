"""`make test`'s pytest-xdist workers build a shared session fixture (a demo study, a two-node
cluster) once: conftest.py puts the tests that use it in one xdist group, and the group must
reach xdist's scheduler. With pytest 9.2 and pytest-xdist 3.8 it did not (each worker built the
demo study and the two-node cluster once more) until conftest copied xdist's group name into the
node id. This runs pytest with two workers and this suite's conftest on a module of its own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

MODULE = '''
import os
import time

import pytest


@pytest.fixture(scope="session")
def built_once():
    with open(os.environ["BUILT_LOG"], "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")


@pytest.mark.parametrize("i", range(6))
def test_shares_the_fixture(built_once, i):
    time.sleep(0.2)  # long enough that the second worker asks for work meanwhile


@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    time.sleep(0.2)
'''


def test_tests_sharing_a_session_fixture_run_in_one_worker(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_grouped.py").write_text(MODULE)
    log = tmp_path / "built.txt"
    env = {**os.environ, "BUILT_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "loadgroup", str(tmp_path / "test_grouped.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "12 passed" in done.stdout, done.stdout[-2000:]
    built_by = log.read_text().split()
    assert len(built_by) == 1, f"the session fixture was built by {built_by}"
