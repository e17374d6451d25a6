"""raysd compare: which trials it runs, the table it prints, and a real side-by-side run."""
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from helpers import TINY, kill_processes_mentioning, plant_pickles
from raysd import cli
from raysd.compare import method_variants, summary_table, trial_variants
from raysd.errors import ConfigError


def test_method_variants_are_methods_by_seeds_with_rounds_only_for_self_distill():
    variants = method_variants(["finetune", "self_distill"], [1, 2], seeds=2)
    assert [(v["variant"], v["values"]["seed"]) for v in variants] == [
        ("finetune", 0), ("finetune", 1), ("self_distill T'=1", 0), ("self_distill T'=1", 1),
        ("self_distill T'=2", 0), ("self_distill T'=2", 1)]
    assert variants[2]["values"] == {"method": "self_distill", "self_distill.rounds": 1, "seed": 0}
    with pytest.raises(ConfigError, match="unknown method 'distill'"):
        method_variants(["distill"], [], 1)


def test_trial_variants_take_the_best_completed_trials_by_validation_only():
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "status": ["completed", "completed", "failed", "completed"],
        "val_accuracy": [0.5, 0.9, 0.99, 0.7], "test_accuracy": [0.99, 0.1, 0.1, 0.1],
        "param.mask_ratio": [0.6, 0.75, 0.9, 0.8], "param.self_distill.rounds": [1.0, 2.0, 3.0, float("nan")]})
    variants = trial_variants(trials, "val_accuracy", "max", top=2, seeds=2)
    assert [v["variant"] for v in variants] == ["b", "b", "d", "d"]
    assert variants[0]["values"] == {"mask_ratio": 0.75, "self_distill.rounds": 2, "seed": 0}
    assert variants[2]["values"] == {"mask_ratio": 0.8, "seed": 0}  # not sampled: the space's
    # a chain study's rows are points: two of one chain are two variants, named ID@T'
    chains = pd.DataFrame({
        "trial_id": ["a", "a", "b"], "status": ["completed"] * 3, "val_accuracy": [0.9, 0.8, 0.7],
        "param.mask_ratio": [0.6, 0.6, 0.75], "param.self_distill.rounds": [1, 2, 0],
        "cfg.self_distill.rounds": [1, 2, 0], "best_point": [True, False, True]})
    variants = trial_variants(chains, "val_accuracy", "max", top=2, seeds=1)
    assert [v["variant"] for v in variants] == ["a@1", "a@2"]
    assert variants[1]["values"] == {"mask_ratio": 0.6, "self_distill.rounds": 2, "seed": 0}


def test_summary_table_means_stds_and_paired_interval():
    rows = pd.DataFrame({
        "variant": ["finetune"] * 3 + ["self_distill"] * 3, "status": ["completed"] * 6,
        "seed": [0, 1, 2] * 2, "val_accuracy": [0.5, 0.6, 0.7, 0.6, 0.7, 0.9],
        "test_accuracy": [0.50, 0.52, 0.60, 0.55, 0.60, 0.62],
        "init_distance": [1.0, 2.0, 3.0, 0.5, 0.5, 0.5], "gen_gap": [0.1] * 6})
    table = summary_table(rows, "val_accuracy", "finetune").set_index("variant")
    assert table.loc["finetune", "val_accuracy"] == "0.6000 ± 0.1000"
    assert table.loc["self_distill", "init_distance"] == "0.5000 ± 0.0000"
    diffs = pd.Series([0.05, 0.08, 0.02])  # paired by seed
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert table.loc["self_distill", "test_accuracy - finetune"] == (
        f"{diffs.mean():+.4f} [{diffs.mean() - half:+.4f}, {diffs.mean() + half:+.4f}]")


def test_an_interrupted_comparison_resumes_and_writes_its_table(tmp_path, capsys):
    """Ctrl-C mid-comparison exits 130 naming `raysd compare --resume`; that finishes the
    trials left and writes the table, without re-running the finished ones. Resuming it with
    `tune`, or with flags that choose other trials, is refused before Ray starts. The finished
    comparison has its methods by seeds side by side (the suite's one end-to-end compare)."""
    ray_tmp = tempfile.mkdtemp(prefix="rsd", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    study = tmp_path / "cmp"
    trials_file, table = study / "results" / "trials.parquet", study / "results" / "compare.txt"
    command = [sys.executable, "-m", "raysd.cli", "compare", "--space", "demo", *TINY,
               "--methods", "finetune,self_distill", "--seeds", "2", "--max-concurrent", "1",
               "--storage", str(tmp_path), "--name", "cmp"]
    try:
        driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        deadline = time.time() + 400
        while not trials_file.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)  # the first trial is recorded; the second one is running
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 130, out[-2000:] + err[-2000:]
        assert f"raysd compare --resume {study}" in err and not table.exists()
        done_before = pq.read_table(trials_file).to_pandas()
        assert len(done_before) == 1

        assert cli.main(["tune", "--resume", str(study)]) == 2
        assert cli.main(["compare", "--resume", str(study), "--seeds", "3"]) == 2
        errors = capsys.readouterr().err
        assert f"a raysd compare study; finish it with raysd compare --resume {study}" in errors
        assert "drop --seeds" in errors
        marker = tmp_path / "unpickled"
        assert "tuner.pkl" in plant_pickles(study, marker)  # what Tuner.restore unpickled

        resumed = subprocess.run([sys.executable, "-m", "raysd.cli", "compare", "--resume", str(study)],
                                 env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    finally:
        kill_processes_mentioning(ray_tmp)
    after = pq.read_table(trials_file).to_pandas()
    assert sorted(zip(after.method, after.seed)) == [
        ("finetune", 0), ("finetune", 1), ("self_distill", 0), ("self_distill", 1)]
    assert (after["cfg.seed"] == after.seed).all() and set(after.status) == {"completed"}
    # Two seeds are two different trainings, not one run recorded twice.
    assert after[after.method == "finetune"].val_loss.nunique() == 2
    first = after[after.trial_id == done_before.trial_id[0]].iloc[0]  # recorded once, not re-run
    assert first.wall_seconds == done_before.wall_seconds[0]
    assert not marker.exists()  # --resume unpickled nothing from the study folder
    text = table.read_text()
    assert text in resumed.stdout and "test_accuracy - finetune" in text
    assert {"finetune", "self_distill"} <= set(text.split()) and "(baseline)" in text
    assert (study / "results" / "compare.png").stat().st_size > 1000
