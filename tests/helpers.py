"""Helpers for tests that start processes: tiny study flags, and ending exactly what we started."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from raysd.cluster import DRIVER_RESOURCE

BIN = Path(sys.executable).parent

TINY = [
    "--set", "weights=none",
    "--set", "further_pretrain.steps=4", "--set", "further_pretrain.batch_size=16",
    "--set", "self_distill.steps=4", "--set", "self_distill.batch_size=16",
    "--set", "finetune.steps=8", "--set", "finetune.batch_size=16", "--set", "finetune.warmup_steps=2",
    "--set", "evaluation.every=4", "--set", "logging.log_every=2",
    # What a trial pays for and no test reads: mid-stage checkpoints (stage boundaries still
    # write theirs; tests that kill a worker ask for more), whole-split evaluation, a big k-NN bank.
    "--set", "logging.checkpoint_every=8", "--set", "evaluation.max_examples=64",
    "--set", "evaluation.signal_examples=64",
]
# Long enough a self-distillation round that a kill lands inside it, with a checkpoint every
# 4 steps to resume from (used after TINY: later flags win).
SLOW_ROUND = ["--set", "self_distill.steps=32", "--set", "self_distill.rounds=1",
              "--set", "logging.checkpoint_every=4"]


# While this file exists, the Ray Train rank it names reads the data source it names instead
# of the trial's: a path missing on one node, as when a mount is absent there. JSON
# {"rank": int, "data": str}; installed in every worker of the session's Ray by rank_fault_hook.
RANK_FAULT = Path(tempfile.gettempdir()) / f"raysd-test-rank-fault-{os.getpid()}.json"


def rank_fault_hook(flag: Path = RANK_FAULT) -> Callable[[], None]:
    """A Ray `worker_process_setup_hook` that wraps raysd.data.load_task before raysd.train
    imports it, to apply `flag`'s fault while the flag exists. A closure, so Ray ships it by
    value: the workers need not import this file."""

    def install() -> None:
        import raysd.data

        real = raysd.data.load_task

        def load_task(source, **options):
            if flag.exists():
                import json

                import ray.train

                fault = json.loads(flag.read_text())
                if ray.train.get_context().get_world_rank() == fault["rank"]:
                    source = fault["data"]
            return real(source, **options)

        raysd.data.load_task = load_task

    return install


class _Unpickled:
    """Unpickling this creates `marker`: how a planted pickle would run code on the head."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_pickles(folder: Path, marker: Path) -> set[str]:
    """Replace every *.pkl under `folder` and Tune's other saved state (search_gen_state-*.json
    is a pickle too; experiment_state-*.json) with a pickle whose loading creates `marker`; the
    names of those files."""
    planted = pickle.dumps(_Unpickled(marker))
    found = [p for pattern in ("*.pkl", "search_gen_state-*", "experiment_state-*") for p in folder.rglob(pattern)]
    for path in found:
        path.write_bytes(planted)
    return {path.name for path in found}


def train_worker_count(address: str) -> int:
    """RayTrainWorker actors the Ray at `address` has started so far, alive or not."""
    from ray.util.state import list_actors

    return len(list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")],
                           limit=10_000))


def wait_for_other_drivers(ray, timeout: float = 120) -> None:
    """Until no actor another driver owned on the session's Ray is left (a driver attached with
    --address that was killed or interrupted): its trials must not run beside the next ones.
    Detached actors outlive their driver by design (Ray's own, e.g. its AutoscalingCoordinator)."""
    import time

    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    deadline = time.time() + timeout
    while True:
        left = [a for a in list_actors(address=context.gcs_address, filters=[("state", "!=", "DEAD")],
                                       limit=10_000, detail=True)
                if a.job_id != context.get_job_id() and not a.is_detached]
        if not left:
            return
        assert time.time() < deadline, f"still alive after {timeout:.0f} s: {left}"
        time.sleep(0.5)


def _has_open_file_under(proc: Path, marker: str) -> bool:
    try:
        return any(marker in os.readlink(fd) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line or environment mentions `marker` (our temp dir),
    or that holds a file under it open: the agents of a node that Ray's fake autoscaler (v2)
    starts get neither, but write their logs there."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in text or _has_open_file_under(proc, marker):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def listening_addresses(marker: str) -> set[str]:
    """The local IP addresses on which processes mentioning `marker` accept TCP connections,
    read from /proc (::ffff:127.0.0.1 reads as 127.0.0.1)."""
    import ipaddress

    inodes = set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or marker.encode() not in (
                    (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()):
                continue
            inodes |= {os.readlink(fd)[8:-1] for fd in (proc / "fd").iterdir()
                       if os.readlink(fd).startswith("socket:[")}
        except OSError:
            continue
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add(str(ip.ipv4_mapped if getattr(ip, "ipv4_mapped", None) else ip))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict) -> tuple[subprocess.Popen, str]:
    """A local moto S3 server on loopback, answering, with a bucket `raysd`: (process, endpoint)."""
    import time

    import boto3

    port = free_port()
    server = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="raysd")
    return server, endpoint


def add_node(address: str, name: str, env: dict, cpus: int = 1, drivers: bool = True) -> None:
    """`ray start` a worker node whose processes all carry RAYSD_TEST_NODE=<name>, offering
    raysd_driver (trials' drivers run there: cluster.DRIVER_RESOURCE) unless `drivers` is False.
    Its dashboard agent gets a port of its own: Ray's default (52365) is taken by the first node."""
    extra = ["--resources", json.dumps({DRIVER_RESOURCE: 1000})] if drivers else []
    run_ok([BIN / "ray", "start", "--address", address, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(cpus), "--dashboard-agent-listen-port", str(free_port()), *extra,
            "--disable-usage-stats"], {**env, "RAYSD_TEST_NODE": name})


def actor_nodes(address: str, env: dict, class_name: str) -> set[str]:
    """The node ids of every actor (alive or dead) of this class on the cluster at `address`."""
    out = run_ok([BIN / "ray", "list", "actors", "--address", address, "--filter",
                  f"class_name={class_name}", "--detail", "--format", "json", "--limit", "1000"], env)
    return {actor["node_id"] for actor in json.loads(out.stdout)}


def run_ok(args, env, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=cwd)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out
