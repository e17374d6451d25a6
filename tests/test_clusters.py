"""clusters/: launcher configs pass Ray's own validation; nothing exposes the dashboard."""

import copy
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"


def _load(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _is_k8s_manifest(doc: Dict[str, Any]) -> bool:
    return "apiVersion" in doc and "kind" in doc


LAUNCHER_CONFIGS = sorted(
    p for p in CLUSTERS.glob("*.yaml") if not _is_k8s_manifest(_load(p))
)
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"


def _ray_up_validate(config: Dict[str, Any]) -> Dict[str, Any]:
    """What `ray up` checks before it calls the cloud: merge defaults, then schema."""
    merged = prepare_config(copy.deepcopy(config))
    validate_config(merged)
    return merged


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif node is not None:
        yield str(node)


def _public_binds(config: Dict[str, Any]) -> List[str]:
    """Every string that would bind a Ray server to all interfaces."""
    return [s for s in _strings(config) if "0.0.0.0" in s or "dashboard-host=::" in s]


def test_both_clouds_have_a_launcher_config():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    merged = _ray_up_validate(_load(path))
    workers = [
        name
        for name, node_type in merged["available_node_types"].items()
        if name != merged["head_node_type"] and node_type["max_workers"] > 0
    ]
    assert workers, "no worker node type can be launched"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(dashbord_host="127.0.0.1"),
        lambda c: next(iter(c["available_node_types"].values())).update(resourcez={}),
        lambda c: c["docker"].update(imag="rayproject/ray"),
        lambda c: c.update(max_workers="many"),
    ],
    ids=["top-level typo", "node-type typo", "docker typo", "wrong type"],
)
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_validation_rejects_a_broken_config(path, breakage):
    config = _load(path)
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _ray_up_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_dashboard_stays_on_loopback_with_token_auth(path):
    merged = _ray_up_validate(_load(path))
    assert _public_binds(merged) == []
    head_start = " ".join(merged["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(merged[key]), key
    assert "~/.ray/auth_token" in merged["file_mounts"].values()


def test_loopback_check_catches_rays_default_start_command():
    # Dropping our head_start_ray_commands would inherit Ray's default, which binds
    # the dashboard to 0.0.0.0; the check above must notice.
    config = _load(LAUNCHER_CONFIGS[0])
    del config["head_start_ray_commands"]
    assert _public_binds(_ray_up_validate(config))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_image_matches_installed_ray(path):
    image = _load(path)["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


def test_dockerfile_base_matches_installed_ray():
    base = re.search(r"^FROM\s+(\S+)", (CLUSTERS / "Dockerfile").read_text(), re.M)
    assert base and base.group(1).startswith(f"rayproject/ray:{ray.__version__}-")


def test_rayjob_runs_raysd_on_gpu_workers():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert "raysd tune" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert len(workers) >= 1
    for group in workers:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_dashboard_is_cluster_internal_with_token_auth():
    job = _load(RAYJOB)
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert cluster["authOptions"]["mode"] == "token"
    assert _public_binds(job) == []
    assert head["rayStartParams"].get("dashboard-host") not in ("0.0.0.0", "::")
    with open(RAYJOB) as f:
        assert len(list(yaml.safe_load_all(f))) == 1, "no extra Services / Ingresses"


def test_rayjob_pods_run_unprivileged_without_an_api_token():
    cluster = _load(RAYJOB)["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _kuberay_pod_labels(node_type: str, cluster: str, group: str, template: Dict[str, Any]) -> Dict[str, str]:
    """The labels KubeRay (v1.5.1 to v1.7, ray-operator/controllers/ray/common/pod.go labelPod)
    gives a Ray pod: its own, then the pod template's, which cannot override the first three."""
    own = {"ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": cluster,
           "ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
           "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels = dict(own)
    for key, value in ((template.get("metadata") or {}).get("labels") or {}).items():
        if key not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):
            labels[key] = value
    return labels


def _selects(selector: Dict[str, Any], labels: Dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # all this policy uses
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_network_policy_admits_only_the_clusters_pods_and_the_operator():
    """The policy's selectors match the pods KubeRay really creates for kuberay-rayjob.yaml
    (a RayJob's cluster is named <job>-<random>), and nothing else."""
    policy = _load(CLUSTERS / "kuberay-networkpolicy.yaml")
    cluster = _load(RAYJOB)["spec"]["rayClusterSpec"]
    assert _load(RAYJOB)["spec"]["submissionMode"] == "SidecarMode"  # no submitter pod to admit
    ours = [_kuberay_pod_labels("head", "raysd-vit-small-x7k2p", "headgroup",
                                cluster["headGroupSpec"]["template"])]
    ours += [_kuberay_pod_labels("worker", "raysd-vit-small-x7k2p", group["groupName"], group["template"])
             for group in cluster["workerGroupSpecs"]]
    other_cluster = _kuberay_pod_labels("head", "other-q1w2e", "headgroup", {})
    operators = [  # KubeRay's Helm chart and its kustomize manifests (config/manager)
        {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
         "app.kubernetes.io/component": "kuberay-operator"},
        {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}]
    spec = policy["spec"]
    assert policy["kind"] == "NetworkPolicy" and spec["policyTypes"] == ["Ingress"]
    assert all(_selects(spec["podSelector"], pod) for pod in ours)
    assert not _selects(spec["podSelector"], other_cluster)
    in_cluster, operator = spec["ingress"]
    [peer] = in_cluster["from"]
    assert set(peer) == {"podSelector"} and "ports" not in in_cluster
    assert all(_selects(peer["podSelector"], pod) for pod in ours)
    assert not _selects(peer["podSelector"], other_cluster) and not _selects(peer["podSelector"], {})
    [peer] = operator["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ray-system"}
    assert all(_selects(peer["podSelector"], labels) for labels in operators)
    assert not any(_selects(peer["podSelector"], pod) for pod in ours)  # Ray pods are not it
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_nccl_uses_a_real_interface(path):
    options = " ".join(_load(path)["docker"]["run_options"])
    assert "NCCL_SOCKET_IFNAME=^lo,docker0" in options


# What must stay on the user's machine, and the code a cluster needs (repository-relative).
LOCAL_ONLY = [".git/config", ".venv/bin/python", "data/train/a.png", "raysd_results/s/trials.parquet",
              "theta.pt", "m.pth", "m.ckpt", "pytorch_model.bin", "model.safetensors",
              "events.out.tfevents.1.host", ".env", ".env.local", "key.pem", "id.key",
              "id_rsa", "id_ed25519.pub", ".aws/credentials", ".ray/auth_token", "auth_token"]
SHIPPED = ["raysd/recipe.py", "raysd/data/base.py", "raysd/models/vit.py", "search_spaces/demo.yaml",
           "pyproject.toml", "README.md", "clusters/aws-gpu.yaml"]


def test_rayignore_keeps_weights_results_and_secrets_off_the_cluster(tmp_path):
    """`ray job submit --working-dir .` reads .rayignore with Ray's own matcher: what must stay
    local is excluded, the code the job runs is not."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    (tmp_path / ".rayignore").write_text((CLUSTERS.parent / ".rayignore").read_text())
    [excluded] = get_excludes_from_ignore_files(tmp_path, include_gitignore=False)
    assert [p for p in LOCAL_ONLY if not excluded(tmp_path / p)] == []
    assert [p for p in SHIPPED if excluded(tmp_path / p)] == []


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_ray_up_syncs_no_secrets_data_or_weights(path, tmp_path):
    """Every file mount copied as `ray up` copies it (rsync with the arguments Ray's own command
    runner builds from rsync_exclude / rsync_filter), into a local folder instead of a node."""
    import os
    import shutil
    import subprocess

    from ray.autoscaler._private.command_runner import SSHCommandRunner

    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (ray up needs it too)")
    config = _load(path)
    repo, home, node = tmp_path / "repo", tmp_path / "home", tmp_path / "node"
    for name in LOCAL_ONLY + SHIPPED:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    for name in (".gitignore", ".rayignore"):
        shutil.copy(CLUSTERS.parent / name, repo / name)
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("token")  # the one secret that is mounted on purpose
    args = SSHCommandRunner._create_rsync_filter_args(None, {
        "rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")})
    for remote, local in config["file_mounts"].items():
        source = Path(local.replace("~", str(home), 1)) if local.startswith("~") else repo / local
        target = node / remote.lstrip("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = "/" if source.is_dir() else ""  # as Ray's updater does for folders
        subprocess.run(["rsync", "-a", *args, f"{source}{suffix}", f"{target}{suffix}"], check=True)
    synced = {str(p.relative_to(node / "raysd")) for p in (node / "raysd").rglob("*") if p.is_file()}
    assert [p for p in LOCAL_ONLY if p in synced] == []
    assert [p for p in SHIPPED if p not in synced] == []
    assert (node / "raysd_auth_token").read_text() == "token"
    assert sorted(os.listdir(node)) == ["raysd", "raysd_auth_token"]
