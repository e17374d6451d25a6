"""Reading a study folder without Ray: the one definition of the best trial, old studies, running
trials' history, and report / export / ls / compare's table importing no Ray."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysd.storage import Store
from raysd.study_folder import StudyFolder, best_row, ranked
from test_report import make_study

ROOT = Path(__file__).resolve().parents[1]


def _trials(*rows) -> list[dict]:
    return [{"trial_id": tid, "status": status, "val_loss": value} for tid, status, value in rows]


def test_best_is_the_first_ended_of_equal_completed_trials_by_mode():
    rows = _trials(("a", "completed", 0.5), ("b", "stopped", 0.1), ("c", "completed", 0.3),
                   ("d", "completed", float("nan")), ("e", "failed", None), ("f", "completed", 0.3))
    assert ranked(pd.DataFrame(rows), "val_loss", "min")["trial_id"].tolist() == ["c", "f", "a"]
    assert ranked(pd.DataFrame(rows), "val_loss", "max")["trial_id"].tolist() == ["a", "c", "f"]
    assert best_row(rows, "val_loss", "min") is rows[2]  # the row as given, not a copy
    assert best_row(rows[1:2], "val_loss", "min") is None  # stopped early: never the best
    assert ranked(pd.DataFrame(rows), "val_accuracy", "max").empty


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_row_and_ranked_agree_on_any_rows(mode):
    """best_row is plain Python for the driver, ranked a DataFrame for reports: one definition."""
    rng = random.Random(mode)
    for _ in range(300):
        rows = [{"trial_id": f"t{i}", "status": rng.choice(["completed", "completed", "stopped", "failed"]),
                 "val_loss": rng.choice([None, float("nan"), 0.1, 0.2, 0.3, rng.random()])}
                for i in range(rng.randrange(0, 8))]
        done = ranked(pd.DataFrame(rows), "val_loss", mode) if rows else pd.DataFrame()
        expected = done["trial_id"].iloc[0] if len(done) else None
        best = best_row(rows, "val_loss", mode)
        assert (best["trial_id"] if best else None) == expected, rows


def test_a_folder_reads_its_space_trials_statuses_and_a_trials_values(tmp_path):
    folder = StudyFolder(str(make_study(tmp_path)))
    assert folder.space().study.metric == "val_accuracy" and folder.objective() == ("val_accuracy", "max")
    assert folder.counts() == {"completed": 5, "stopped": 1, "failed": 1}
    assert folder.best()["trial_id"] == "t1"  # t5 scores higher but was stopped early
    t0 = folder.trial("t0")
    assert t0["val_accuracy"] == 0.80 and "param.self_distill.mae_weight" not in t0  # NaN left out
    assert folder.trial("nope") is None
    assert len(folder.history()) == 5 * 5 and folder.updated() is not None


def test_an_old_study_with_asha_step_keys_still_reads(tmp_path):
    study = make_study(tmp_path)
    doc = yaml.safe_load((study / "space.yaml").read_text())
    doc.setdefault("study", {})["scheduler"] = {"type": "asha", "metric": "val_accuracy",
                                                "mode": "max", "max_t": 100, "grace_period": 1}
    (study / "space.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert StudyFolder(str(study)).space().study.scheduler == {"type": "asha", "grace_period": 1}


def test_an_old_studys_setting_columns_read_under_todays_names(tmp_path):
    import pyarrow.parquet as pq

    from raysd.config import LEGACY_COLUMNS
    from raysd.report import write_report

    study = make_study(tmp_path)
    path = study / "results" / "trials.parquet"
    table = pq.read_table(path)
    rounds = table.column("cfg.self_distill.rounds").to_pylist()
    old_name = {new: old for old, new in LEGACY_COLUMNS.items()}
    pq.write_table(table.rename_columns([old_name.get(c, c) for c in table.column_names]), path)
    assert "cfg.rounds" in pq.read_schema(path).names
    trials = StudyFolder(str(study)).trials()
    assert "cfg.rounds" not in trials and trials["cfg.self_distill.rounds"].tolist() == rounds
    assert "top 5 of 5 completed trials" in write_report(str(study))


def test_history_reads_both_layouts_each_row_once(tmp_path):
    """An old study's history.parquet and history_parts/ (a crash left t0's part behind after
    t0 ended) and the dataset's parts read as one history, a row written twice read once (the
    last)."""
    study = make_study(tmp_path)
    store = Store(str(study))
    row = {"trial_id": "t9", "stage": "finetune", "round": 0, "step": 5, "attempt": 0, "loss": 1.0}
    store.write_rows([row], "results", "history_parts", "t9-00000.parquet")
    store.write_rows([{**row, "loss": 0.5}, {**row, "step": 6}], "results", "history", "t9-00000.parquet")
    t0 = StudyFolder(str(study)).history_rows()[0]
    store.write_rows([t0], "results", "history_parts", "t0-00000.parquet")
    history = StudyFolder(str(study)).history()
    assert len(history) == 5 * 5 + 2
    t9 = history[history.trial_id == "t9"]
    assert t9.step.tolist() == [5, 6] and t9.loss.tolist() == [0.5, 1.0]


def _comparison(root: Path) -> Path:
    study = make_study(root / "compare")
    rows = [{"trial_id": f"{v}{s}", "status": "completed", "variant": v, "seed": s,
             "val_accuracy": 0.5 + s / 10, "test_accuracy": 0.4 + s / 10 + (v == "b") / 20,
             "init_distance": 1.0, "gen_gap": 0.1} for v in ("a", "b") for s in range(2)]
    Store(str(study)).write_rows(rows, "results", "trials.parquet")
    return study


RAY_FREE = """
import sys
import raysd.report, raysd.export, raysd.compare, raysd.study_folder, raysd.writers, raysd.cli
assert "ray" not in sys.modules, "importing raysd's readers imported Ray"
from raysd.cli import main
from raysd.compare import write_table
study, storage, out, comparison = sys.argv[1:]
assert main(["report", study]) == 0
assert main(["ls", storage]) == 0
assert main(["export", study, out]) == 2  # the synthetic study saved no model
assert "paired differences against a" in write_table(comparison, "val_accuracy", ["a", "b"])
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, f"report, ls, export or compare's table imported {loaded[:5]}"
"""


def test_report_export_ls_and_compare_table_never_import_ray(tmp_path):
    study = make_study(tmp_path / "storage")
    comparison = _comparison(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RAY_FREE, str(study), str(study.parent),
                           str(tmp_path / "out"), str(comparison)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top 5 of 5 completed trials" in done.stdout and "demo-20240101-000000" in done.stdout
    assert "no saved model" in done.stderr
    assert (comparison / "results" / "compare.png").exists()
