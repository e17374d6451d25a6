"""What does each concurrent trial cost the head node in memory? A `ray start` cluster on this
host - a head with 0 CPUs and two worker nodes offering CPUs and the custom resource `raysd_driver`
(where trial drivers will live once they leave the head), each node its own `ray start` with
--node-ip-address 127.0.0.1 and its own ports - runs N concurrent `raysd tune --space
demo --smoke` trials (weights none, no shared artifacts, no kept models: only the processes
differ from a real study). While they run, every node's Ray worker processes are sampled: which
they are from Ray's State API (list_workers / list_actors: node, pid, actor class), their memory
from /proc (RSS, and PSS, which shares a library's pages among the processes that map it).

  python benchmarks/head_memory.py                  # 1, 2 and 4 concurrent trials
  python benchmarks/head_memory.py --sizes 2 --cpus-per-node 1

Each size gets a fresh cluster, so idle workers left by one size do not count in the next one's
baseline. Prints, per size, a table per node: the sum of RSS of its Ray worker processes idle
(before the study) and at its peak, and (peak - idle) / N; the same for all of its processes
(raylet, GCS, dashboard and agents too). Then, per actor class, where it ran and the peak of its
processes' summed RSS per trial (Ray workers without an actor by process title: ray::IDLE, a
task's name); the trial's non-training processes (the trial driver ImplicitFunc, Ray Train's
TrainController and helper actors, the Tune session's queue actor) add up to T. Ends with
    head_memory: head_mb_per_trial=H trial_mb=T
H: the head's extra worker-process MB per concurrent trial at the widest concurrency; T: the
non-training processes' MB per trial there.

Every process it starts carries a marker (the name of a fresh folder under /tmp, its RAY_TMPDIR,
also in each node's NODE_TAG) and is killed by it when the size ends, on an error, on Ctrl-C and
on SIGTERM too; never `ray stop`, which would end every Ray of the host.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MB = 1024 * 1024
NODE_TAG = "RAYSD_HEADMEM_NODE"  # every process of a node carries NODE_TAG=<marker>-<node>
# A trial's processes that do not train: Tune's trial driver (a function trainable), Ray Train's
# controller and its helper actors. RayTrainWorker is the training itself.
# _QueueActor: the Tune session's queue between the controller and the trial driver, one a trial.
NON_TRAINING = ("ImplicitFunc", "TrainController", "PlacementGroupCleaner", "DatasetManager",
                "SynchronizationActor", "PreemptionWatcher", "_QueueActor")
TRAINING = ("RayTrainWorker",)
# One a cluster (detached), on the node of the first TrainController that asked for it; one a
# study, on the head: raysd's placement-group janitor (raysd/janitor.py).
PER_CLUSTER = ("_AutoscalingCoordinatorActor", "PlacementGroupJanitor")
KNOWN = (*NON_TRAINING, *TRAINING, *PER_CLUSTER)
NO_ACTOR = "(no actor)"  # Ray worker processes that run a task or wait idle, by process title
NODES = ("head", "w1", "w2")
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # every node's, by process title
# The cheapest real study: --smoke's few steps; nothing downloaded or built (weights none), every
# trial trains its own stages (no artifacts to wait on) and keeps no model.
STUDY_FLAGS = ["--space", "demo", "--smoke", "--set", "weights=none", "--artifacts", "none",
               "--keep-models", "none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process but this one whose command line or environment mentions `marker`,
    or that has a file under the folder /tmp/<marker> open. (Ray's agents retitle themselves,
    which overwrites the start of /proc/<pid>/environ, RAY_TMPDIR with it; the node tag, set
    last, survives, and their log files stay open.)"""
    folder = f"/tmp/{marker}/"
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            found = marker.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            if not found:
                for fd in (proc / "fd").iterdir():
                    try:
                        if os.readlink(fd).startswith(folder):
                            found = True
                            break
                    except OSError:
                        continue
            if found:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def _run_ok(args, env, timeout=300) -> None:
    out = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd="/")
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {out.stdout[-2000:]}{out.stderr[-2000:]}")


class Cluster:
    """A head (0 CPUs) and two worker nodes on loopback, each its own `ray start`; a context
    manager that kills every process it started, by its marker, on the way out."""

    def __init__(self, cpus_per_node: int):
        self.cpus = cpus_per_node
        self.marker = tempfile.mkdtemp(prefix="rhm", dir="/tmp")  # short: socket paths are length-limited
        name = os.path.basename(self.marker)
        self.tags = {f"{name}-head": "head", f"{name}-w1": "w1", f"{name}-w2": "w2"}
        # Multi-node on one host needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, as for conftest's
        # two_nodes; Ray then turns --node-ip-address 127.0.0.1 into the host's address and its
        # servers listen on every interface: hence token auth, with a token of this cluster's own
        # (this process sends it with its State API requests, and changes nothing of its own Ray
        # settings). PYTHONPATH: Ray's workers import this checkout's raysd.
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "RAY_TMPDIR": self.marker, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", NODE_TAG):
            self.env.pop(key, None)
        self.address = self.dashboard = ""
        self._state = None

    def __enter__(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        gcs, dashboard = free_port(), free_port()  # every port our own: other Rays may run on the host
        name = os.path.basename(self.marker)
        store = ["--object-store-memory", str(200 * MB)]  # three nodes on one host's /dev/shm
        _run_ok([BIN / "ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs,
                 "--num-cpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
                 "--ray-client-server-port", free_port(), "--dashboard-agent-listen-port", free_port(),
                 *store, "--disable-usage-stats"], {**self.env, NODE_TAG: f"{name}-head"})
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        for node in ("w1", "w2"):
            for attempt in (1, 2):  # on a busy host a raylet can miss `ray start`'s 30 s to register
                try:
                    _run_ok([BIN / "ray", "start", "--address", self.address, "--node-ip-address",
                             "127.0.0.1", "--num-cpus", self.cpus, "--resources",
                             json.dumps({"raysd_driver": 1000}), "--dashboard-agent-listen-port",
                             free_port(), *store, "--disable-usage-stats"],
                            {**self.env, NODE_TAG: f"{name}-{node}"})
                    break
                except RuntimeError as err:
                    if attempt == 2 or "timed out during startup" not in str(err):
                        raise
                    while kill_processes_mentioning(f"{name}-{node}"):  # what that start left
                        time.sleep(0.2)
        self._wait_for_nodes(3)

    def list(self, resource: str, filters: list) -> list:
        """The State API's `resource` ("nodes", "workers", "actors") matching `filters`."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        if self._state is None:
            self._state = StateApiClient(address=self.dashboard, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        return self._state.list(StateResource(resource), options=ListApiOptions(
            limit=10_000, filters=filters), raise_on_missing_output=False)

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                alive = self.list("nodes", [("state", "=", "ALIVE")])
                if len(alive) >= count:
                    return
            except Exception:  # the dashboard that serves the State API is still starting
                if time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise RuntimeError(f"{count} nodes never came up at {self.address}")
            time.sleep(1)

    def close(self) -> None:
        for _ in range(20):  # until a pass finds none: one may have started during the last
            if not kill_processes_mentioning(os.path.basename(self.marker)):
                break
            time.sleep(0.2)
        shutil.rmtree(self.marker, ignore_errors=True)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MB, from /proc; (0, 0) once it has exited."""
    rss = pss = 0.0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) / 1024
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(b"Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


class Sampler:
    """Samples of the cluster's memory: which node every process belongs to (its NODE_TAG), which
    of them are Ray workers and which actor class each runs (State API), and their memory."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._tag_of: dict[int, str | None] = {}
        self.samples: list[dict] = []
        # pid -> actor class, as soon as the State API or the process title names it. A worker
        # that will host an actor is titled ray::IDLE while it imports the actor's modules, so
        # its samples are assigned to the class it turned out to run when the run is summed up.
        self.actor_of: dict[int, str] = {}

    def _node_of(self, pid: int, depth: int = 0) -> str | None:
        """The node whose NODE_TAG the process carries, else its parent's: Ray's agents and
        workers retitle themselves, which can overwrite /proc/<pid>/environ; their parent, the
        raylet, keeps its own."""
        if pid not in self._tag_of:
            environ = _read(f"/proc/{pid}/environ").split(b"\0")
            tag = next((e.split(b"=", 1)[1].decode() for e in environ
                        if e.startswith(NODE_TAG.encode() + b"=")), None)
            node = self.cluster.tags.get(tag)
            if node is None and depth < 3:
                stat = _read(f"/proc/{pid}/stat")
                parent = int(stat.rsplit(b")", 1)[1].split()[1]) if stat else 0
                node = self._node_of(parent, depth + 1) if parent > 1 else None
            self._tag_of[pid] = node
        return self._tag_of[pid]

    def sample(self) -> dict:
        """{"time", "nodes": {node: {workers_rss, workers_pss, all_rss, all_pss}}, "workers":
        [(pid, node, rss, pss, process title)] of the Ray workers, "titles": {(node, process
        title)} of all processes}, also kept in self.samples."""
        workers = self.cluster.list("workers", [("is_alive", "=", True)])
        actors = self.cluster.list("actors", [("state", "=", "ALIVE")])
        self.actor_of.update({a.pid: a.class_name for a in actors if a.pid})
        ray_workers = {w.pid for w in workers if w.worker_type == "WORKER" and w.pid}
        ray_workers |= {a.pid for a in actors if a.pid}
        out = {"time": time.time(), "workers": [], "titles": set(),
               "nodes": {node: {"workers_rss": 0.0, "workers_pss": 0.0, "all_rss": 0.0, "all_pss": 0.0}
                         for node in NODES}}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            node = self._node_of(pid)
            if node is None:  # not this cluster's (the `raysd tune` client carries no node tag)
                continue
            rss, pss = memory_mb(pid)
            if not rss:  # it has exited
                continue
            totals = out["nodes"][node]
            totals["all_rss"] += rss
            totals["all_pss"] += pss
            title = _read(f"/proc/{pid}/cmdline").split(bytes(1))[0].decode(errors="replace")
            out["titles"].add((node, title))
            if pid in ray_workers:
                totals["workers_rss"] += rss
                totals["workers_pss"] += pss
                # ray::<Class>.<method>: an actor the State API lists once it is created
                what = title.removeprefix("ray::").split(".")[0]
                if pid not in self.actor_of and what in KNOWN:
                    self.actor_of[pid] = what
                out["workers"].append((pid, node, rss, pss, title))
        self.samples.append(out)
        return out

    def classes(self, sample: dict) -> dict[str, dict]:
        """A sample's Ray workers by actor class (else NO_ACTOR and their title: ray::IDLE, a
        task's name): {class: {rss, pss, count, nodes}}."""
        out: dict[str, dict] = {}
        for pid, node, rss, pss, title in sample["workers"]:
            name = self.actor_of.get(pid) or f"{NO_ACTOR} {title}"
            cls = out.setdefault(name, {"rss": 0.0, "pss": 0.0, "count": 0, "nodes": set()})
            cls["rss"] += rss
            cls["pss"] += pss
            cls["count"] += 1
            cls["nodes"].add(node)
        return out


def _baseline(sampler: Sampler, timeout: float = 60) -> dict[str, dict]:
    """Each node's idle memory, once it is up (its agents, which a node starts after `ray start`
    returns, are running) and steady: the mean of the first three samples, half a second apart,
    in which no node's processes grew by 10 MB or more (after `timeout` s, the last three)."""
    keys = ("workers_rss", "workers_pss", "all_rss", "all_pss")
    taken, deadline = [], time.time() + timeout
    while True:
        taken = (taken + [sampler.sample()])[-3:]
        up = all((node, agent) in taken[-1]["titles"] for node in NODES for agent in AGENTS)
        if len(taken) == 3 and (time.time() > deadline or up and all(
                abs(later["nodes"][node]["all_rss"] - earlier["nodes"][node]["all_rss"]) < 10
                for earlier, later in zip(taken, taken[1:]) for node in NODES)):
            return {node: {k: sum(t["nodes"][node][k] for t in taken) / 3 for k in keys} for node in NODES}
        time.sleep(0.5)


def measure(trials: int, cpus_per_node: int | None = None, interval: float = 0.5,
            timeout: float = 1200, extra: list[str] | None = None) -> dict:
    """Run `trials` concurrent smoke trials of the demo space (`extra`: more raysd tune flags) on a
    fresh cluster whose worker nodes have `cpus_per_node` CPUs each (default: half of `trials`,
    rounded up), sampling it every `interval` s. Returns summarize()'s figures and the study's
    console output ("log")."""
    cpus = cpus_per_node or max(1, math.ceil(trials / 2))
    with Cluster(cpus) as cluster:
        sampler = Sampler(cluster)
        idle = _baseline(sampler)
        sampler.samples.clear()
        started = time.time()
        log = Path(cluster.marker, "tune.log")
        with open(log, "w") as out:
            tune = subprocess.Popen(
                [sys.executable, "-m", "raysd.cli", "tune", *STUDY_FLAGS, "--num-samples", str(trials),
                 "--max-concurrent", str(trials), "--address", cluster.address,
                 "--storage", str(Path(cluster.marker, "storage")), "--name", f"headmem{trials}",
                 *(extra or [])],
                env=cluster.env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
            while tune.poll() is None:
                if time.time() - started > timeout:
                    raise RuntimeError(f"raysd tune took over {timeout:.0f} s")  # killed by the marker
                try:
                    sampler.sample()
                except Exception as err:  # a State API call timed out on a busy host: skip it
                    print(f"head_memory: sample skipped ({type(err).__name__}: {err})", file=sys.stderr)
                time.sleep(interval)
        wall = time.time() - started
        if tune.returncode != 0:
            raise RuntimeError(f"raysd tune exited {tune.returncode}:\n{log.read_text()[-4000:]}")
        return {**summarize(trials, cpus, idle, sampler, wall), "log": log.read_text()}


def summarize(trials: int, cpus: int, idle: dict, sampler: Sampler, wall: float) -> dict:
    """Per node, for its Ray workers and for all its processes, RSS and PSS: {idle, peak,
    per_trial = (peak - idle) / trials}; per class, at the sample where its processes' summed RSS
    peaked: {kind, nodes (all it ran on), peak_count, rss_per_trial, pss_per_trial}; and
    head_mb_per_trial, trial_mb (the non-training classes' summed RSS at its peak, per trial),
    trial_pss_mb, drivers_at_once (most trial drivers alive in one sample)."""
    samples = sampler.samples
    if not samples:
        raise RuntimeError("no sample of the cluster was taken while the trials ran")
    nodes = {}
    for node in NODES:
        row = {}
        for key in ("workers_rss", "workers_pss", "all_rss", "all_pss"):
            peak = max(s["nodes"][node][key] for s in samples)
            row[key] = {"idle": idle[node][key], "peak": peak,
                        "per_trial": (peak - idle[node][key]) / trials}
        nodes[node] = row
    by_sample = [sampler.classes(s) for s in samples]
    classes, placed = {}, defaultdict(set)
    for sample in by_sample:
        for name, cls in sample.items():
            placed[name] |= cls["nodes"]
    for name in sorted(placed):
        cls = max((s[name] for s in by_sample if name in s), key=lambda c: c["rss"])
        classes[name] = {"kind": kind_of(name), "nodes": sorted(placed[name]), "peak_count": cls["count"],
                         "rss_per_trial": cls["rss"] / trials, "pss_per_trial": cls["pss"] / trials}

    def non_training(sample: dict, mem: str) -> float:
        return sum(cls[mem] for name, cls in sample.items() if name in NON_TRAINING)

    return {"trials": trials, "cpus_per_node": cpus, "wall_s": wall, "samples": len(samples),
            "drivers_at_once": max(s.get("ImplicitFunc", {"count": 0})["count"] for s in by_sample),
            "nodes": nodes, "classes": classes,
            "head_mb_per_trial": nodes["head"]["workers_rss"]["per_trial"],
            "trial_mb": max(non_training(s, "rss") for s in by_sample) / trials,
            "trial_pss_mb": max(non_training(s, "pss") for s in by_sample) / trials}


def kind_of(name: str) -> str:
    return ("non-training" if name in NON_TRAINING else "training" if name in TRAINING
            else "per cluster or study" if name in PER_CLUSTER else "other")


def table(result: dict) -> str:
    n = result["trials"]
    lines = [f"{n} concurrent trial(s): {result['cpus_per_node']} CPU(s) per worker node, "
             f"{result['wall_s']:.0f} s, {result['samples']} samples, at most "
             f"{result['drivers_at_once']} trial driver(s) alive at once",
             f"  {'node':5s} {'Ray worker processes RSS MB':>36s}   {'(PSS MB)':>24s}   "
             f"{'all node processes RSS MB':>30s}",
             f"  {'':5s} {'idle':>10s} {'peak':>10s} {'+/trial':>14s}   {'idle':>7s} {'peak':>7s} "
             f"{'+/trial':>8s}   {'idle':>8s} {'peak':>8s} {'+/trial':>10s}"]
    for node, row in result["nodes"].items():
        w, p, a = row["workers_rss"], row["workers_pss"], row["all_rss"]
        lines.append(f"  {node:5s} {w['idle']:10.0f} {w['peak']:10.0f} {w['per_trial']:14.0f}   "
                     f"{p['idle']:7.0f} {p['peak']:7.0f} {p['per_trial']:8.0f}   "
                     f"{a['idle']:8.0f} {a['peak']:8.0f} {a['per_trial']:10.0f}")
    lines.append(f"  {'actor class':28s} {'kind':13s} {'ran on':12s} {'alive at peak':>13s} "
                 f"{'RSS MB/trial':>13s} {'PSS MB/trial':>13s}")
    for name, cls in result["classes"].items():
        lines.append(f"  {name:28s} {cls['kind']:13s} {','.join(cls['nodes']):12s} {cls['peak_count']:13d} "
                     f"{cls['rss_per_trial']:13.0f} {cls['pss_per_trial']:13.0f}")
    lines.append(f"  non-training processes together (peak of their sum): {result['trial_mb']:.0f} MB RSS "
                 f"per trial ({result['trial_pss_mb']:.0f} MB PSS)")
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4", help="concurrent trials, comma-separated")
    parser.add_argument("--cpus-per-node", type=int,
                        help="CPUs of each worker node (default: half the size, rounded up)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args(argv)
    # SIGTERM ends like Ctrl-C: every `with Cluster` on the way out kills its processes.
    signal.signal(signal.SIGTERM, _interrupt)
    results = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(measure(size, args.cpus_per_node, interval=args.interval))
            print(table(results[-1]), flush=True)
    except KeyboardInterrupt:  # the cluster of the size under way is gone already
        print("head_memory: interrupted", file=sys.stderr)
        return 130
    widest = max(results, key=lambda r: r["trials"])
    print(f"head_memory: head_mb_per_trial={widest['head_mb_per_trial']:.0f} trial_mb={widest['trial_mb']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
