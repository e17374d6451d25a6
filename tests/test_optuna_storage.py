"""Where a study's Optuna trials live: --optuna-storage URL, checked before Ray starts."""
from __future__ import annotations

import optuna
import pytest

from raysd import cli, optuna_study
from raysd.spaces import load_space


def test_an_rdb_storage_receives_the_searchers_trials(tmp_path):
    """The searcher the study runs writes its trials to the RDB under the study's name."""
    from raysd.study import _searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load_space("demo", {"study.optuna_storage": url})
    searcher = _searcher(space, str(tmp_path / "mystudy"))
    config = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {**config, "val_accuracy": 0.75})
    loaded = optuna.load_study(study_name="mystudy", storage=url)
    assert [t.value for t in loaded.trials] == [0.75]
    assert loaded.trials[0].params["mask_ratio"] == config["mask_ratio"]
    assert optuna_study.load(str(tmp_path / "mystudy"), url).trials[0].value == 0.75


def test_a_name_taken_in_the_rdb_or_a_bad_url_is_one_line_exit_2(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="taken", storage=url)
    argv = ["tune", "--space", "demo", "--storage", str(tmp_path / "s"), "--name", "taken"]
    assert cli.main([*argv, "--optuna-storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a study named 'taken'" in err
    assert cli.main([*argv, "--optuna-storage", "nosuchdb://x"]) == 2
    assert "--optuna-storage nosuchdb://x" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing written
