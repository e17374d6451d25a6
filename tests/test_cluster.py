"""Cluster planning without a cluster: how many trials fit on given nodes (Ray is imported,
never started)."""
from __future__ import annotations

import pytest

from raysd.cluster import slots, trials_that_fit, worker_bundle
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
