"""Clusters of several nodes on loopback: one trial's DDP ranks spread over two `ray start` nodes
(equal to two ranks on one node, and resumed after its second node is killed), and a study on
Ray's fake autoscaler that must scale up from a head that cannot run a trial.
Every process started here is ended here, by its marker."""
import json
import secrets
import subprocess
import sys
import time

import pyarrow.parquet as pq
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider

from helpers import (BIN, SLOW_ROUND, TINY, actor_nodes, add_node, free_port, kill_processes_mentioning,
                     run_ok)
from raysd.cluster import DRIVER_RESOURCE
from test_faults import SELF_DISTILL, checkpoint_position


def _raysd(args, env):
    return subprocess.Popen([sys.executable, "-m", "raysd.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/")


def test_ranks_on_two_nodes_match_one_node_and_survive_losing_a_node(slow_round_reference, two_nodes,
                                                                     tmp_path):
    """The session's two-node cluster (conftest.two_nodes); its worker node is killed here and
    a third node takes its place."""
    address, env = two_nodes["address"], two_nodes["env"]
    args = ["run", "--space", "demo", *TINY, *SLOW_ROUND, "--workers", "2"]
    # Reference: the same trial with both ranks on one node (the session's local Ray).
    one = slow_round_reference
    assert one["num_nodes"] == 1

    shared = tmp_path / "shared"  # the same folder on both nodes, as NFS would be
    started = time.time()
    driver = _raysd([*args, "--set", "resources.placement=spread", "--address", address,
                     "--storage", str(shared), "--name", "spread"], env)
    killed_at = None
    deadline = time.time() + 400
    while killed_at is None and driver.poll() is None and time.time() < deadline:
        position = checkpoint_position(shared / "spread" / "train")
        if position and position[0] == SELF_DISTILL and position[1] >= 8:
            # the node's raylet and its workers
            assert kill_processes_mentioning(f"RAYSD_TEST_NODE={two_nodes['second']}") > 0
            killed_at = position
            third = two_nodes["second"].replace("-second", "-third")
            add_node(address, third, env)  # the replacement the trial waits for
        time.sleep(0.2)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    assert killed_at is not None, "the second node was never killed"
    wall = time.time() - started

    row = pq.read_table(shared / "spread" / "results" / "trials.parquet").to_pylist()[0]
    assert row["status"] == "completed" and row["cfg.resources.placement"] == "spread"
    nodes = row["worker_nodes"].split(",")
    assert row["num_nodes"] == 2 and len(set(nodes)) == 2  # rank 0 and rank 1 on different nodes
    assert row["restarts"] == 1 and row["resumed_from"].startswith("self_distill round 1 step ")
    assert int(row["resumed_from"].split()[-1]) > 0
    for metric in ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "init_distance"):
        assert row[metric] == one[metric], metric
    # The trial's driver lived on the killed node (raysd_driver, not the head): Tune started it
    # again on the replacement, and its Train run resumed from the checkpoint (asserted above).
    nodes_up = json.loads(run_ok([BIN / "ray", "list", "nodes", "--address", address, "--format",
                                  "json"], env).stdout)
    head = {n["node_id"] for n in nodes_up if n["is_head_node"]}
    drivers = actor_nodes(address, env, "ImplicitFunc")
    assert len(drivers) == 2 and not drivers & head, drivers
    print(f"two-node trial {wall:.0f} s; ranks on {nodes}; killed at {killed_at}, resumed from "
          f"{row['resumed_from']}; val_accuracy {row['val_accuracy']:.4f} (one node "
          f"{one['val_accuracy']:.4f}), val_loss {row['val_loss']!r} (one node {one['val_loss']!r})")


FAKE_PROVIDER = f"{FakeMultiNodeProvider.__module__}.{FakeMultiNodeProvider.__name__}"


def _fake_autoscaler_config(gcs: int) -> dict:
    """Ray's fake multi-node provider: 'nodes' are raylets started on this machine on demand, by
    autoscaler v2 (what `ray up` runs since Ray 2.50, so what the shipped cluster configs get)."""
    return {
        "cluster_name": "raysd-fake", "max_workers": 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "head_node_type": "ray.head.default",
        # "external": the same provider, without the defaults file that Ray's wheel lacks
        # (fake_multi_node/example.yaml), which autoscaler v2 reads for "fake_multinode".
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": f"127.0.0.1:{gcs}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},  # v2's
        "available_node_types": {
            # The head runs no training worker. Trial drivers go to nodes offering raysd_driver
            # once one is up (cluster.DRIVER_RESOURCE); the autoscaler does not say which node
            # types it may add, so the first trials' drivers start on the head.
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.trainer": {"resources": {"CPU": 2, DRIVER_RESOURCE: 1000}, "node_config": {},
                                   "min_workers": 0, "max_workers": 1},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_study_scales_an_autoscaling_cluster_up_from_zero_workers(marked_env, tmp_path):
    gcs = free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_fake_autoscaler_config(gcs)))
    env = {**marked_env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # autoscaler v2, as `ray up` starts the head (the fake provider names its nodes' instances)
    head_env = {**env, "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    run_ok([BIN / "ray", "start", "--head", "--autoscaling-config", config, "--node-ip-address",
            "127.0.0.1", "--port", gcs, "--num-cpus", "0", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", free_port(), "--ray-client-server-port", free_port(),
            "--disable-usage-stats"], head_env)
    address = f"127.0.0.1:{gcs}"
    status = subprocess.run([BIN / "ray", "status", "--address", address], env=env,
                            capture_output=True, text=True, timeout=60)
    for _ in range(60):  # the autoscaler's monitor reports itself within seconds of the head
        if "Autoscaler status" in status.stdout:
            break
        time.sleep(1)
        status = subprocess.run([BIN / "ray", "status", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "raysd.cli", "tune", "--space", "demo", *TINY,
                          "--num-samples", "2", "--address", address, "--storage", str(tmp_path),
                          "--name", "scaled"], env=env, capture_output=True, text=True,
                         timeout=900, cwd="/")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "waiting for the autoscaler" in out.stdout
    rows = pq.read_table(tmp_path / "scaled" / "results" / "trials.parquet").to_pylist()
    # two chains (the demo's T' in 0..2), a row per point, each chain run across the cluster
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 2
    assert {r["status"] for r in rows} == {"completed"}
    nodes = json.loads(run_ok([BIN / "ray", "list", "nodes", "--address", address, "--format",
                               "json"], env).stdout)
    assert len(nodes) >= 2  # the autoscaler added the trainer node the trials ran on
    workers = {r["worker_nodes"] for r in rows}
    head = [n["node_id"] for n in nodes if n["is_head_node"]]
    assert head and not workers & set(head)
