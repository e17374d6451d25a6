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
