"""An installed wheel (not an editable checkout) knows its spaces and runs a trial, as the
cluster image (`pip install .`) and KubeRay's RayJob do."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq

from helpers import TINY, run_ok

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_spaces_and_runs_a_trial(marked_env, tmp_path):
    run_ok([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "--wheel-dir", tmp_path / "dist", REPO], marked_env, timeout=600)
    wheel = next((tmp_path / "dist").glob("raysd-*.whl"))
    venv = tmp_path / "venv"
    run_ok([sys.executable, "-m", "venv", venv], marked_env)
    # The venv takes raysd from the wheel alone; its dependencies come from this environment
    # (a .pth line adds a folder, not the editable finder that folder holds).
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Without PYTHONPATH: pip takes a checkout on it that holds raysd.egg-info for raysd installed.
    outside = {**marked_env, "PYTHONPATH": ""}
    run_ok([venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], outside,
           timeout=600)
    where = run_ok([venv / "bin" / "python", "-c", "import raysd.spaces as s; print(s.SPACES_DIR)"],
                   outside, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(site)), where  # not the repository's folder

    spaces = run_ok([venv / "bin" / "raysd", "spaces"], outside, cwd=tmp_path).stdout.split("\n")
    shipped = {path.stem for path in (REPO / "search_spaces").glob("*.yaml")}  # demo_text too
    assert shipped >= {"demo", "demo_text", "vit_small", "vit_base_mae", "roberta_base"}
    assert shipped <= {line.split()[0] for line in spaces if line}

    # --method is checked here too: a one-trial run the suite pays for anyway
    out = subprocess.run([venv / "bin" / "raysd", "run", "--space", "demo", *TINY,
                          "--method", "further_pretrain", "--storage", tmp_path / "s", "--name", "wheel"],
                         env=outside, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = pq.read_table(tmp_path / "s" / "wheel" / "results" / "trials.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    assert rows[0]["cfg.method"] == "further_pretrain" and "seconds_self_distill_1" not in rows[0]


def test_torch_is_pinned_where_weights_only_loading_cannot_run_code():
    """Checkpoints and artifacts on shared storage are loaded with weights_only=True, which
    could still run code before torch 2.6 (CVE-2025-32434)."""
    from importlib.metadata import version

    import pytest
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    [torch] = [r for r in map(Requirement, project["project"]["dependencies"]) if r.name == "torch"]
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")
    assert torch.specifier.contains(version("torch").split("+")[0])
