"""raysd compare: which trials it runs, the table it prints, and a real side-by-side run."""
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from helpers import TINY
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


def test_compare_runs_methods_by_seeds_side_by_side_and_writes_the_table(ray_local, tmp_path, capsys):
    code = cli.main(["compare", "--space", "demo", *TINY, "--methods", "finetune,self_distill",
                     "--seeds", "2", "--max-concurrent", "3", "--storage", str(tmp_path),
                     "--name", "cmp"])
    out = capsys.readouterr().out
    assert code == 0, out
    trials = pq.read_table(tmp_path / "cmp" / "results" / "trials.parquet").to_pandas()
    assert sorted(zip(trials.method, trials.seed)) == [
        ("finetune", 0), ("finetune", 1), ("self_distill", 0), ("self_distill", 1)]
    assert (trials["cfg.seed"] == trials.seed).all() and set(trials.status) == {"completed"}
    # Two seeds are two different trainings, not one run recorded twice.
    assert trials[trials.method == "finetune"].val_loss.nunique() == 2
    text = (tmp_path / "cmp" / "results" / "compare.txt").read_text()
    assert "self_distill" in text and "test_accuracy - finetune" in text and text in out
    assert (tmp_path / "cmp" / "results" / "compare.png").stat().st_size > 1000
