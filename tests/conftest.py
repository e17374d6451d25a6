"""Shared fixtures: tiny configs and one real local Ray per test session, on loopback."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Callable

# Keep every Ray node of the tests on loopback (Ray otherwise picks the network interface).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# `make test`'s pytest-xdist workers share the cores: torch in each (the tests' own run_trial
# calls, the text demo's pre-training, and every process they start) takes its share of them,
# not one thread per core. With a thread per core, OpenMP's threads spin against the other
# worker's: beside one busy core the text demo's build took 652 s with 2 threads, 58 s with 1.
# (Ray gives its trial workers one thread per CPU they reserve all the same.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# Tests build their own tokenizer and demo weights, never touching the user's cache.
os.environ["RAYSD_CACHE"] = tempfile.mkdtemp(prefix="raysd-test-cache-")

import pytest  # noqa: E402

from raysd import config, schema  # noqa: E402
from raysd.config import TrialConfig  # noqa: E402

TINY_STAGE = {"steps": 4, "batch_size": 16, "lr": 1e-3}
TINY = {"model": "vit_tiny", "weights": "none", "data": "builtin:digits",
        "further_pretrain": TINY_STAGE, "self_distill": TINY_STAGE,
        "finetune": {**TINY_STAGE, "warmup_steps": 2},
        "evaluation": {"batch_size": 512, "signal_examples": 256},
        "logging": {"log_every": 2, "checkpoint_every": 2}}


def tiny_config(values: dict | None = None, /, **top) -> TrialConfig:
    """A ViT trial small enough for a unit test on one CPU core, with settings changed by
    dotted name (`{"self_distill.rounds": 2}`) or, for top-level ones, by keyword."""
    cfg = schema.with_values(schema.parse(TrialConfig, TINY, "tiny_config"), {**(values or {}), **top},
                             "tiny_config")
    config.check(cfg, "tiny_config")
    return cfg


@pytest.fixture(scope="session")
def digits():
    from raysd.data import load_task

    return load_task("builtin:digits", image_size=32)


@pytest.fixture(scope="session")
def ray_local():
    """One isolated local Ray for every test that needs it (starting Ray costs seconds). Give
    its `get_runtime_context().gcs_address` to the State API: other Rays may run on the host."""
    import ray

    from helpers import rank_fault_hook
    from raysd.cluster import start_local_ray

    # Short: Ray's socket paths are length-limited, and an xdist worker's tmp_path is long.
    temp = tempfile.mkdtemp(prefix="rst", dir="/tmp")
    start_local_ray(num_cpus=3, log_to_driver=False, _temp_dir=temp,
                    runtime_env={"worker_process_setup_hook": rank_fault_hook()})  # inert unless armed
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def marked_env():
    """An environment whose RAY_TMPDIR marks every process started with it; they end with the test."""
    from helpers import kill_processes_mentioning

    marker = tempfile.mkdtemp(prefix="rsj", dir="/tmp")  # short: socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": marker, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    yield env
    kill_processes_mentioning(marker)


# Servers shared by several tests end after the last test that uses them, not when the session
# ends: on a 2-core machine an idle Ray cluster takes CPU and memory from every test after it.
_stops: dict[str, Callable[[], None]] = {}  # fixture name -> how to end what it started
_last_users: dict[str, pytest.Item] = {}


def pytest_collection_finish(session):
    for item in session.items:
        for name in ("moto_s3", "two_nodes"):
            if name in item.fixturenames:
                _last_users[name] = item


# `make test` runs the suite in two pytest-xdist workers (--dist loadgroup): one trial uses about
# one of this machine's two cores. Tests that share a fixture built once per session or module
# (a Ray cluster, a study, a moto server) go to one worker, so it is still built once.
_CHEAP_SHARED = {"ray_local", "digits"}  # every worker starts its own: seconds


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    root: dict[str, str] = {}

    def find(key: str) -> str:
        while root.setdefault(key, key) != key:
            key = root[key]
        return key

    keys_of = {}
    for item in items:
        keys = []
        for name, defs in item._fixtureinfo.name2fixturedefs.items():
            fixture = defs[-1]
            ours = getattr(fixture.func, "__module__", "").split(".")[-1]
            if fixture.scope in ("session", "module") and name not in _CHEAP_SHARED and (
                    ours == "conftest" or ours.startswith("test_")):
                keys.append(name if fixture.scope == "session" else f"{ours}.{name}")
        for key in keys[1:]:
            root[find(key)] = find(keys[0])
        keys_of[item] = keys
    for item, keys in keys_of.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(find(keys[0])))
    # Whole modules move, the slowest first, so neither worker is left with a long test at the
    # end while the other idles (xdist hands out work in collection order).
    first_seen = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.module.__name__, index)
    items.sort(key=lambda item: (_rank(item.module.__name__), first_seen[item.module.__name__]))


class _GroupsInNodeIds:
    """pytest-xdist 3.8 tells its loadgroup scheduler a test's group by renaming item._nodeid to
    ID@GROUP, which pytest 9.2's node ids (item._id) no longer read: the groups never reach the
    scheduler, a group's tests spread over both workers, and each builds the shared fixture
    (pytest-xdist#1386: a demo study, the two-node cluster and its job twice). Until xdist
    writes the id itself (#1388), this copies its name into the id."""

    @pytest.hookimpl(trylast=True)  # after xdist's own hook, which names the groups
    def pytest_collection_modifyitems(self, config, items):
        if not config.getoption("loadgroup", default=False):  # set in xdist's workers only
            return
        for item in items:
            named = getattr(item, "_nodeid", None)
            if named and named != item.nodeid and hasattr(type(getattr(item, "_id", None)), "parse"):
                item._id = type(item._id).parse(named)
        lost = [item.nodeid for item in items
                if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            warnings.warn(pytest.PytestWarning(
                f"{len(lost)} tests lost their xdist_group ({lost[0]}, ...): every worker builds "
                "the shared fixtures those tests use"))


def pytest_configure(config):
    config.pluginmanager.register(_GroupsInNodeIds(), "raysd-xdist-groups")


# The modules whose tests start Ray studies, costliest first (`make test` prints the durations).
_SLOW_MODULES = ("test_cluster_jobs", "test_study", "test_compare", "test_smoke", "test_text_demo",
                 "test_resume", "test_head_memory", "test_multinode", "test_faults", "test_packaging",
                 "test_optuna_storage", "test_chain")


def _rank(module: str) -> int:
    name = module.rsplit(".", 1)[-1]
    return _SLOW_MODULES.index(name) if name in _SLOW_MODULES else len(_SLOW_MODULES)


def pytest_runtest_teardown(item, nextitem):
    for name, last in _last_users.items():
        if item is last and name in _stops:
            _stops.pop(name)()


def _session_server(name: str) -> dict:
    """An environment like marked_env's for a session fixture's server; registers its end."""
    from helpers import kill_processes_mentioning

    marker = tempfile.mkdtemp(prefix="rss", dir="/tmp")  # short: socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": marker, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    _stops[name] = lambda: kill_processes_mentioning(marker)
    return env


@pytest.fixture(scope="session")
def moto_s3():
    """One local moto S3 server with bucket `raysd` for the session: the AWS_* variables that
    point pyarrow and boto3 at it (tests put their objects under their own prefixes)."""
    from helpers import start_moto

    server, endpoint = start_moto(_session_server("moto_s3"))
    _stops["moto_s3"] = lambda: (server.kill(), server.wait())
    yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    _stops.pop("moto_s3", lambda: None)()


@pytest.fixture(scope="session")
def two_nodes():
    """A `ray start` cluster with token auth on loopback: a head and a worker node, one CPU
    each, so a 2-worker trial needs both. Shared by the `ray job submit` test and the
    multi-node test (which kills the worker node and adds another): {"address": GCS address,
    "dashboard": job API URL, "env": the environment to reach it, "second": the worker node's
    RAYSD_TEST_NODE, which every process of that node carries}."""
    import secrets

    from helpers import BIN, add_node, free_port, run_ok

    # Multi-node needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1. With it Ray 2.60 also listens on the
    # host's address besides --node-ip-address 127.0.0.1 (seen by benchmarks/head_memory.py);
    # token auth with this session's own token keeps the cluster to this test session.
    env = {**_session_server("two_nodes"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    gcs, dash = free_port(), free_port()  # every port our own: other Rays may run on the host
    run_ok([BIN / "ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs,
            "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--num-cpus", "1",
            "--ray-client-server-port", free_port(), "--dashboard-agent-listen-port", free_port(),
            "--disable-usage-stats"], env)
    address = f"127.0.0.1:{gcs}"
    second = f"{os.path.basename(env['RAY_TMPDIR'])}-second"  # no other session's node
    add_node(address, second, env)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env, "second": second}
    _stops.pop("two_nodes", lambda: None)()


@pytest.fixture(scope="session")
def demo_smoke_job(two_nodes, tmp_path_factory):
    """`raysd tune --space demo --smoke` submitted with `ray job submit` to the two-node cluster,
    as one would before a cluster run: test_cluster_jobs checks the job, test_smoke[demo] the
    smoke study. (the finished `ray job submit`, the study folder, seconds it took)"""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers import BIN

    storage = tmp_path_factory.mktemp("job")
    submit = [BIN / "ray", "job", "submit", "--address", two_nodes["dashboard"],
              "--working-dir", str(Path(__file__).resolve().parent.parent), "--",
              sys.executable, "-m", "raysd.cli", "tune", "--space", "demo", "--smoke",
              "--set", "weights=none", "--storage", str(storage), "--name", "job"]
    deadline = time.time() + 300  # the head's job agent comes up after `ray start` returns
    while True:  # (seconds on an idle machine, minutes on a busy one)
        started = time.time()
        job = subprocess.run(submit, env=two_nodes["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            break
        time.sleep(3)
    return job, storage / "job", time.time() - started


@pytest.fixture(scope="session")
def diverged_trial(ray_local, tmp_path_factory):
    """One `raysd run` whose further pre-training diverges (lr 1e30), on the session's Ray:
    its exit code, study folder, console output, the log records it left, and how many
    RayTrainWorker actors it started. test_study and test_faults assert on the same run."""
    import contextlib
    import io
    import logging
    import types

    from helpers import TINY, train_worker_count
    from raysd import cli

    def workers() -> int:
        return train_worker_count(ray_local.get_runtime_context().gcs_address)

    class Keep(logging.Handler):  # what pytest's caplog does: a handler on the root logger
        def __init__(self):
            super().__init__(level=0)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    storage = tmp_path_factory.mktemp("diverged")
    before, keep, out = workers(), Keep(), io.StringIO()
    logging.getLogger().addHandler(keep)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(["run", "--space", "demo", *TINY, "--set", "further_pretrain.lr=1e30",
                             "--set", "further_pretrain.steps=40", "--storage", str(storage),
                             "--name", "nan"])
    finally:
        logging.getLogger().removeHandler(keep)
    print(out.getvalue())
    return types.SimpleNamespace(code=code, study=storage / "nan", out=out.getvalue(),
                                 records=keep.records, new_train_workers=workers() - before)


@pytest.fixture(scope="session")
def slow_round_reference(ray_local, tmp_path_factory):
    """One uninterrupted 2-worker DDP trial with a long self-distillation round, on one node:
    the reference a trial that loses a worker or a node must match exactly. Its trials.parquet row."""
    import pyarrow.parquet as pq

    from helpers import SLOW_ROUND, TINY
    from raysd import cli

    storage = tmp_path_factory.mktemp("reference")
    assert cli.main(["run", "--space", "demo", *TINY, *SLOW_ROUND, "--workers", "2",
                     "--storage", str(storage), "--name", "pack"]) == 0
    return pq.read_table(storage / "pack" / "results" / "trials.parquet").to_pylist()[0]
