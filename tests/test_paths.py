"""Relative paths mean the user's working directory, whichever directory reads them later
(Ray runs trials and jobs elsewhere; the CLI itself leaves for the temp folder)."""
import os

from raysd import optuna_study
from raysd.overrides import parse_overrides
from raysd.spaces import available, load_space


def test_relative_paths_in_set_and_space_files_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "hub").mkdir()
    text = available()["demo"].read_text().replace("weights: builtin:demo", "weights: w")
    (tmp_path / "rel.yaml").write_text(text.replace("data: builtin:digits", "data: imagefolder:d"))
    space = load_space("rel.yaml", parse_overrides([
        "study.artifacts=arts/", "study.optuna_storage=sqlite:///o.db?timeout=5",
        "search.weights={type: choice, choices: [w, 'hf:hub@main', hf:facebook/vit-mae-base, none]}"]))
    assert space.doc["weights"] == str(tmp_path / "w")
    assert space.doc["data"] == f"imagefolder:{tmp_path / 'd'}"
    assert space.study.artifacts == str(tmp_path / "arts")
    assert space.study.optuna_storage == f"sqlite:///{tmp_path / 'o.db'}?timeout=5"
    weights = next(p for p in space.params if p.key == "weights")
    assert weights.choices == (str(tmp_path / "w"), f"hf:{tmp_path / 'hub'}@main",
                               "hf:facebook/vit-mae-base", "none")


def test_a_relative_sqlite_optuna_storage_lands_where_the_user_typed_it(tmp_path, monkeypatch):
    """Today's bug: the driver leaves for the temp folder, and sqlite:///optuna.db went there."""
    user, elsewhere = tmp_path / "user", tmp_path / "elsewhere"
    user.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(user)
    space = load_space("demo", {"study.optuna_storage": "sqlite:///optuna.db"})
    os.chdir(elsewhere)  # what cli.cmd_tune does before Ray starts
    optuna_study.storage(str(tmp_path / "study"), space.study.optuna_storage).engine.dispose()
    assert (user / "optuna.db").is_file() and not (elsewhere / "optuna.db").exists()
