"""Cluster planning: what a trial needs of a node, how many trials fit, whether a local storage
path is shared by every node, and attaching to (or starting) Ray."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

from raysd.config import TrialConfig
from raysd.errors import ConfigError
from raysd.spaces import Space


def worker_bundle(cfg: TrialConfig) -> dict[str, float]:
    """One Ray Train worker's resources as a node must offer them."""
    need = cfg.worker_resources()
    if cfg.resources.accelerator_type:
        need[f"accelerator_type:{cfg.resources.accelerator_type}"] = 0.001
    return need


def slots(node: dict, need: dict) -> int:
    """How many workers needing `need` fit on a node with resources `node`."""
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items())


def trials_that_fit(cfg: TrialConfig, nodes: list[dict]) -> int:
    """Trials whose worker groups fit on these nodes at once, under the trial's placement."""
    per_node = [slots(node, worker_bundle(cfg)) for node in nodes]
    if cfg.resources.placement == "strict_pack":
        return sum(n // cfg.resources.workers for n in per_node)
    if cfg.resources.placement == "strict_spread":  # each trial's workers on distinct nodes
        trials = 0
        while sum(min(n, trials + 1) for n in per_node) >= (trials + 1) * cfg.resources.workers \
                and sum(n > 0 for n in per_node) >= cfg.resources.workers:
            trials += 1
        return trials
    return sum(per_node) // cfg.resources.workers


def alive_node_resources() -> list[dict]:
    """The resources of each node that is up now."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def autoscaler_node_types() -> list[dict] | None:
    """Resources of each node type an autoscaler may start; [] when it does not say which,
    None when the cluster has no autoscaler (it is what is up now).

    Ray's GCS holds the node types only where something reported them (its ClusterConfig);
    neither of Ray 2.60's own autoscalers does. v1 (`ray start --autoscaling-config`) is known
    by the status its monitor writes, v2 (what `ray up` starts since Ray 2.50) by the state it
    reports; both give []. The private local Ray (start_local_ray) has none."""
    from ray._private import state

    if ray.get_runtime_context().gcs_address == _local_ray_address:
        return None
    config = state.state.get_cluster_config()
    if config is not None:
        return [dict(group.resources) for group in config.node_group_configs]
    deadline = time.monotonic() + MONITOR_WAIT_S
    while (runs := autoscaler_runs()) is None and time.monotonic() < deadline:
        time.sleep(1)  # a cluster just started: its monitor's first round is seconds away
    return [] if runs else None


MONITOR_WAIT_S = 20.0  # Ray's monitors report every 5 s (its AUTOSCALER_UPDATE_INTERVAL_S)


def autoscaler_runs() -> bool | None:
    """True when Ray's autoscaler runs and may add nodes, False when none does, None before
    its monitor's first round.

    v1 (`ray start --autoscaling-config`): its monitor writes a status on every cluster, a plain
    `ray start --head` one too, where it only mirrors the nodes up, each as a read-only node type
    of its own, "node_<node id>" (Ray's format_readonly_node_type). v2 (`ray up` since Ray
    2.50), when the GCS's flag says it is the one to run: it reports its state at every round
    (with or without a config: a plain `ray start` with RAY_enable_autoscaler_v2=1 set by hand
    counts as autoscaling)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        return True if _autoscaler_v2_reported() else None
    raw = _internal_kv_get("__autoscaling_status")
    report = json.loads(raw).get("autoscaler_report") if raw else None
    if report is None:
        return None
    return any(kind != f"node_{node}" for node, kind in (report.get("node_type_mapping") or {}).items())


def _autoscaler_v2_reported() -> bool:
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=30))
    return reply.HasField("autoscaling_state")


def plan_concurrency(space: Space, max_concurrent: int | None, num_samples: int,
                     node_types: list[dict] | None) -> int:
    """How many trials run at once; ConfigError for a trial no node of the cluster can ever run.
    `node_types`: autoscaler_node_types(), asked once per study.

    A fixed cluster runs what fits on it. On an autoscaling cluster the search decides (its
    n_startup_trials independent draws), and trials that do not fit yet wait while their
    pending worker groups ask the autoscaler for nodes."""
    cfg = space.trial_config()
    alive = alive_node_resources()
    need = worker_bundle(cfg)
    what = ", ".join(f"{k} {v:g}" for k, v in need.items())
    if node_types is None or node_types:
        candidates = alive + (node_types or [])
        if not any(slots(node, need) for node in candidates):
            raise ConfigError(
                f"no node of this cluster can run a trial's worker ({what}); set resources.workers, "
                "resources.use_gpu, resources.cpus_per_worker or resources.custom to what its "
                "nodes offer")
    fits_now = trials_that_fit(cfg, alive)
    limit = max_concurrent or space.study.max_concurrent
    if node_types is None:  # nothing will be added: run what fits
        if fits_now < 1:
            raise ConfigError(
                f"this cluster cannot hold one trial's {cfg.resources.workers} workers ({what} each, "
                f"placement {cfg.resources.placement}); lower resources.workers or change resources.placement")
        return min(limit or fits_now, fits_now)
    if fits_now < 1:
        print(f"raysd: no node can take a trial's {cfg.resources.workers} worker(s) ({what}) yet; "
              "waiting for the autoscaler to add nodes", flush=True)
    return limit or max(1, min(num_samples, space.study.n_startup_trials or num_samples))


# Nodes that offer this resource host trials' drivers, and with them each trial's Ray Train
# controller and helper actors (Ray Train places those beside the driver). A driver asks for
# 0.001 of it and for no CPU, so it never takes a slot from a training worker. While no node
# offers it, drivers run on the head, the one node that never goes away.
DRIVER_RESOURCE = "raysd_driver"
HEAD_DRIVER = {"node:__internal_head__": 0.001}


def driver_placement(config: dict | None = None, node_types: list[dict] | None = None
                     ) -> "PlacementGroupFactory":
    """Where a new trial's driver runs (Tune asks as it creates each trial): on a node offering
    DRIVER_RESOURCE, up now or one of `node_types` (autoscaler_node_types, asked once per
    study), else on the head. See README, "Where a trial's processes
    run"."""
    from ray.tune import PlacementGroupFactory

    if _offers_driver_resource(alive_node_resources() + (node_types or [])):
        return PlacementGroupFactory([{DRIVER_RESOURCE: 0.001}])
    return PlacementGroupFactory([HEAD_DRIVER])


def study_driver_placement(node_types: list[dict] | None):
    """driver_placement for a study's trials, given autoscaler_node_types() asked once."""
    return functools.partial(driver_placement, node_types=node_types)


def drivers_may_leave_head(node_types: list[dict] | None) -> bool:
    """Whether a trial's driver may run on a node that can go away: a node offers
    DRIVER_RESOURCE, or an autoscaler (`node_types` not None: autoscaler_node_types()) may add
    one. A local Ray keeps every driver on the head."""
    if node_types is not None:
        return True
    return _offers_driver_resource(alive_node_resources())


def _offers_driver_resource(nodes: list[dict]) -> bool:
    return any(node.get(DRIVER_RESOURCE, 0) > 0 for node in nodes)


def ensure_ray(address: str | None, verbose: bool) -> None:
    """Attach to a running cluster (ray job submit, ray start) or start a local one."""
    if ray.is_initialized():
        return
    kwargs = dict(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING",
                  configure_logging=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as err:
            raise ConfigError(f"--address {address}: no Ray cluster answers there "
                              f"({str(err).strip().splitlines()[-1]})") from None
        return
    # Local Ray, every server on loopback (Ray would otherwise bind the network address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not verbose:  # Ray's note that the private Ray has token auth on; a warning it is off stays
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: "authentication is enabled" not in record.getMessage())
    start_local_ray(num_cpus=os.cpu_count() or 1, **kwargs)


_local_ray_address: str | None = None  # the private local Ray this process started: no autoscaler


def start_local_ray(**kwargs) -> None:
    """A private local Ray whose own processes know its address.

    Ray Train's placement-group cleaner (a trial's, where no janitor is given: janitor.py) asks
    the State API (served by the dashboard, kept on loopback) whether a run's controller is
    alive. Without an address it searches the host and fails when another Ray runs there, and
    finished trials' placement groups are never freed.
    Pinning the GCS port and exporting RAY_ADDRESS to the processes Ray spawns avoids that.
    Every server of this Ray listens on 127.0.0.1 only.
    """
    from ray._private import ray_constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # On Linux Ray turns 127.0.0.1 into the machine's network address unless this variable is
    # 0: read by Ray's processes at start-up, and by this one when `ray` was imported (hence
    # the constant, too), so the node, its dashboard agent and runtime-env agent stay on loopback.
    pinned = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}",
              ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
    saved = {key: os.environ.get(key) for key in pinned}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(pinned)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **kwargs)
        global _local_ray_address
        _local_ray_address = ray.get_runtime_context().gcs_address
    finally:  # Ray's processes keep the pinned values; this process's later children do not
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_shared_storage(study_uri: str) -> None:
    """A local storage path must be the same folder on every node (NFS and the like).

    A marker written here must be visible from each alive node; trials on nodes that join
    later are checked by their workers (train.py) before they train."""
    if "://" in study_uri or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    probe = Path(study_uri).parent / f".raysd-shared-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("raysd")
    try:
        unseen = [node for node, seen in nodes_seeing(str(probe)).items() if not seen]
    finally:
        probe.unlink()
    if unseen:
        raise ConfigError(
            f"--storage {Path(study_uri).parent}: a local folder that node {unseen[0]} cannot see; "
            "a multi-node cluster needs shared storage: an NFS/EFS/Filestore mount present on "
            "every node, or s3://bucket/path, gs://bucket/path")


def nodes_seeing(path: str) -> dict[str, bool]:
    """node id -> whether `path` exists there, asked of every alive node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(p: str) -> bool:
        return os.path.exists(p)

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    refs = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(path) for node in nodes]
    return dict(zip(nodes, ray.get(refs, timeout=120)))
