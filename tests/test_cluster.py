"""Cluster planning without a cluster: how many trials fit on given nodes (Ray is imported,
never started)."""
from __future__ import annotations

import pytest

from raysd import cluster
from raysd.cluster import DRIVER_RESOURCE, HEAD_DRIVER, slots, trials_that_fit, worker_bundle
from raysd.errors import ConfigError
from raysd.spaces import load_space


def _cfg(placement: str, workers: int = 2):
    return load_space("demo", {"resources.workers": workers, "resources.placement": placement}).trial_config()


def test_a_worker_bundle_and_its_slots_on_a_node():
    need = worker_bundle(_cfg("pack"))
    assert need == {"CPU": 1}
    assert slots({"CPU": 3.0, "memory": 1e9}, need) == 3
    assert slots({"GPU": 8.0}, need) == 0  # no CPU on it at all


@pytest.mark.parametrize("placement, nodes, expected", [
    ("pack", [{"CPU": 3}, {"CPU": 3}], 3),  # workers of one trial may straddle nodes
    ("strict_pack", [{"CPU": 3}, {"CPU": 3}], 2),  # one node per trial: a CPU left on each
    ("strict_spread", [{"CPU": 3}, {"CPU": 3}], 3),  # each trial one worker per node
    ("strict_spread", [{"CPU": 6}], 0),  # two workers can never be on distinct nodes
])
def test_trials_that_fit_follow_the_placement(placement, nodes, expected):
    assert trials_that_fit(_cfg(placement), nodes) == expected


WORKER = {"CPU": 8.0, "GPU": 1.0}
OFFERS = {"CPU": 8.0, "GPU": 1.0, DRIVER_RESOURCE: 1000.0}


@pytest.mark.parametrize("alive, node_types, on_the_head, retried", [
    ([{"CPU": 4.0}], None, True, False),  # a local Ray: drivers stay on the head, never retried
    ([{"CPU": 4.0}, OFFERS], None, False, True),  # a worker node offers the resource
    ([{"CPU": 0.0}], [WORKER, OFFERS], False, True),  # node types reported (ClusterConfig), none up yet
    ([{"CPU": 0.0}], [WORKER], True, True),  # reported node types that do not offer it
    ([{"CPU": 0.0}], [], True, True),  # an autoscaler that does not say its node types (v1, v2)
])
def test_a_trials_driver_leaves_the_head_for_a_node_that_offers_raysd_driver(
        monkeypatch, alive, node_types, on_the_head, retried):
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in alive])
    bundles = cluster.study_driver_placement(node_types)({"trial_id": "t0"}).bundles
    assert bundles == ([HEAD_DRIVER] if on_the_head else [{DRIVER_RESOURCE: 0.001}])
    assert "CPU" not in bundles[0]  # a driver never takes a training worker's slot
    assert cluster.drivers_may_leave_head(node_types) is retried


# The status Ray's v1 monitor writes: on every cluster, one read-only node type per node up; with
# an autoscaling config, the config's node types.
READ_ONLY = {"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12", "cd34": "node_cd34"}}}
AUTOSCALING = {"autoscaler_report": {"node_type_mapping": {"10.0.0.1": "ray.head.default",
                                                           "10.0.0.2": "cpu_worker"}}}


@pytest.mark.parametrize("v2_flag, status, v2_reported, expected", [
    (False, None, False, None),  # no monitor status yet (and none comes in the wait): what is up
    (False, {"load_metrics_report": {}}, False, None),  # before the v1 monitor's first round
    (False, READ_ONLY, False, None),  # `ray start` without an autoscaler: what is up now
    (False, AUTOSCALING, False, []),  # autoscaler v1: its node types' names, not their resources
    (True, None, True, []),  # autoscaler v2 (`ray up` since Ray 2.50): its reported state
    (True, None, False, None),  # v2 before its first round (and none comes in the wait)
])
def test_an_autoscaler_v1_or_v2_is_recognised_without_its_node_types(monkeypatch, v2_flag, status,
                                                                      v2_reported, expected):
    import json

    import ray.autoscaler.v2.utils
    import ray.experimental.internal_kv
    from ray._private import state

    monkeypatch.setattr(cluster, "_local_ray_address", None)
    monkeypatch.setattr(cluster, "MONITOR_WAIT_S", 0)
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    raw = json.dumps(status).encode() if status else None
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get",
                        lambda key: raw if key == "__autoscaling_status" else None)
    monkeypatch.setattr(ray.autoscaler.v2.utils, "is_autoscaler_v2", lambda fetch_from_server: v2_flag)
    monkeypatch.setattr(cluster, "_autoscaler_v2_reported", lambda: v2_reported)
    monkeypatch.setattr(cluster.ray, "get_runtime_context",
                        lambda: type("Ctx", (), {"gcs_address": "10.0.0.1:6379"})())
    assert cluster.autoscaler_node_types() == expected


def test_a_cluster_just_started_is_asked_again_until_its_monitor_reports(monkeypatch):
    """`ray up` then at once `raysd tune`: the monitor's first round is seconds away."""
    answers = iter([None, None, True])
    monkeypatch.setattr(cluster, "_local_ray_address", None)
    monkeypatch.setattr(cluster, "autoscaler_runs", lambda: next(answers))
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    from ray._private import state

    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(cluster.ray, "get_runtime_context",
                        lambda: type("Ctx", (), {"gcs_address": "10.0.0.1:6379"})())
    assert cluster.autoscaler_node_types() == []


def test_a_local_ray_is_no_autoscaling_cluster(ray_local):
    """Ray 2.60 flags autoscaler v2 on every cluster, this local one too: raysd must still see
    a cluster that is what is up now, and refuse a trial that can never fit on it at once."""
    import json
    import time

    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.time() + 60  # until Ray's monitor has written a round's status
    while not json.loads(_internal_kv_get("__autoscaling_status") or b"{}").get("autoscaler_report"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert cluster.autoscaler_runs() is False
    assert cluster.autoscaler_node_types() is None and not cluster.drivers_may_leave_head(None)
    space = load_space("demo", {"weights": "none", "resources.workers": 8})
    with pytest.raises(ConfigError, match="cannot hold one trial's 8 workers"):
        cluster.plan_concurrency(space, None, 4, cluster.autoscaler_node_types())


def test_the_private_local_ray_takes_loopback_as_its_node_address():
    """In a plain shell (no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) Ray turns 127.0.0.1 into the
    machine's network address, and its agents and gRPC servers follow it: every server of
    the private Ray must listen on loopback only."""
    import os
    import subprocess
    import sys
    import tempfile

    from helpers import kill_processes_mentioning, listening_addresses

    temp = tempfile.mkdtemp(prefix="rsl", dir="/tmp")  # short: socket paths are length-limited
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    script = ("import ray, sys; from raysd.cluster import start_local_ray; "
              f"start_local_ray(num_cpus=1, log_to_driver=False, _temp_dir={temp!r}); "
              "print(sorted(n['NodeManagerAddress'] for n in ray.nodes()), flush=True); "
              "sys.stdin.readline(); ray.shutdown()")
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        nodes = driver.stdout.readline().strip()
        listening = listening_addresses(temp)
        driver.communicate("\n", timeout=120)
    finally:
        driver.kill()
        kill_processes_mentioning(temp)
    assert nodes == "['127.0.0.1']"
    assert listening == {"127.0.0.1"}
