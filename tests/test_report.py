"""raysd report on a synthetic study folder: ranking, per-parameter effects, failures, PNGs, CLI."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysd.errors import ConfigError
from raysd.report import param_effect, write_report
from raysd.spaces import SPACES_DIR
from raysd.study_folder import StudyFolder, ranked

NAN_ERROR = "NonFiniteLoss: self_distill round 1 step 3: loss is nan"
# trial_id, status, rounds, mae_weight, mask_ratio, val_accuracy, test_accuracy (completion order).
# Test accuracy ranks differently from validation on purpose: t3 is best on test, t1 on val.
TRIALS = [
    ("t0", "completed", 0, None, 0.60, 0.80, 0.90),
    ("t1", "completed", 1, 0.5, 0.75, 0.90, 0.70),
    ("t2", "failed", 2, 0.2, 0.80, None, None),
    ("t3", "completed", 2, 1.0, 0.55, 0.85, 0.95),
    ("t4", "completed", 1, 0.1, 0.70, 0.70, 0.60),
    ("t5", "stopped", 0, None, 0.85, 0.99, None),  # ended early by ASHA: never ranked
    ("t6", "completed", 0, None, 0.65, 0.75, 0.80),
]


def _trial_row(tid, status, rounds, mae, mask, val, test) -> dict:
    done = status == "completed"
    return {
        "trial_id": tid, "status": status, "error": NAN_ERROR if status == "failed" else None,
        "param.self_distill.rounds": rounds, "param.self_distill.mae_weight": mae,
        "param.mask_ratio": mask, "cfg.model": "vit_tiny", "cfg.method": "self_distill",
        "cfg.self_distill.rounds": rounds, "cfg.self_distill.mae_weight": 1.0 if mae is None else mae, "cfg.mask_ratio": mask,
        "val_accuracy": val, "test_accuracy": test, "val_loss": 0.5 if done else None,
        "test_loss": 0.6 if done else None, "train_loss": 0.3 if done else None,
        "gen_gap": 0.3 if done else None, "init_distance": 1.5 if done else None,
        "seconds_further_pretrain": 4.0, "steps_further_pretrain": 60,
        "seconds_finetune": 6.0 if done else None, "steps_finetune": 150 if done else None,
        "wall_seconds": 12.5, "raysd_version": "0.1.0",
    }


def _history(tid: str, final: float) -> list[dict]:
    rows = [{"trial_id": tid, "stage": "further_pretrain", "round": 0, "step": s, "progress": s,
             "loss": 1.0 / s, "mae_loss": 1.0 / s, "val_accuracy": None} for s in (30, 60)]
    rows += [{"trial_id": tid, "stage": "finetune", "round": 0, "step": s, "progress": 60 + s,
              "loss": 1.0 / s, "ce_loss": 1.0 / s, "val_accuracy": final * s / 150}
             for s in (50, 100, 150)]
    return rows


def _write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path)


def make_study(root: Path, trials=TRIALS, rounds: str = "param") -> Path:
    """A demo study whose trials sampled T' (rounds: param), or a chain study's points."""
    study = root / "demo-20240101-000000"
    study.mkdir(parents=True)
    text = (SPACES_DIR / "demo.yaml").read_text()
    assert "  # rounds: chain" in text  # the demo leaves it implicit; a saved study says it
    (study / "space.yaml").write_text(text.replace("  # rounds: chain", f"  rounds: {rounds}"))
    _write([_trial_row(*t) for t in trials], study / "results" / "trials.parquet")
    history = [r for t in trials if t[1] == "completed" for r in _history(t[0], t[5])]
    if history:
        _write(history, study / "results" / "history.parquet")
    return study


@pytest.fixture
def study(tmp_path) -> Path:
    return make_study(tmp_path)


def _trials(study: Path) -> pd.DataFrame:
    return pd.read_parquet(study / "results" / "trials.parquet")


def test_ranks_by_validation_metric_not_test(study):
    text = write_report(str(study), top=3)
    table = text.split("top 3 of 5 completed trials:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["t1", "t3", "t0"]
    assert "t5" not in ranked(_trials(study), "val_accuracy", "max")["trial_id"].tolist()
    assert "trials: 7 (5 completed, 1 stopped, 1 failed)" in text


def test_effect_of_rounds_matches_hand_computation(study):
    space = StudyFolder(str(study)).space()
    done = ranked(_trials(study), "val_accuracy", "max")
    rounds = next(p for p in space.params if p.key == "self_distill.rounds")
    effect = param_effect(done, rounds, "val_accuracy", "max")
    # completed trials: rounds 0 -> 0.80, 0.75; rounds 1 -> 0.90, 0.70; rounds 2 -> 0.85
    assert effect.index.tolist() == [0, 1, 2]
    assert effect["best"].tolist() == pytest.approx([0.80, 0.90, 0.85])
    assert effect["mean"].tolist() == pytest.approx([0.775, 0.80, 0.85])
    assert effect["count"].tolist() == [2, 2, 1]
    text = write_report(str(study))
    assert "effect of self_distill.rounds (per value):" in text
    assert "0.775" in text.split("effect of self_distill.rounds")[1]


def test_float_params_binned_and_unsampled_row(study):
    space = StudyFolder(str(study)).space()
    done = ranked(_trials(study), "val_accuracy", "max")
    params = {p.key: p for p in space.params}
    mae = param_effect(done, params["self_distill.mae_weight"], "val_accuracy", "max")
    assert mae.loc["n/a", "count"] == 2  # rounds == 0: mae_weight never sampled
    assert mae.loc["n/a", "mean"] == pytest.approx(0.775)
    assert mae["count"].sum() == 5
    mask = param_effect(done, params["mask_ratio"], "val_accuracy", "max")
    assert len(mask) == 3 and mask["count"].sum() == 5


def test_failed_error_and_pngs(study):
    text = write_report(str(study))
    assert f"t2: {NAN_ERROR}" in text
    report = study / "results" / "report"
    names = {"param_self_distill.rounds.png", "param_self_distill.mae_weight.png",
             "param_mask_ratio.png", "history.png", "finetune_curves.png"}
    # the (gamma, lambda) view has one panel per T': its width varies
    assert {p.name for p in report.iterdir()} == names | {"gamma_lambda.png"}
    for name in names:
        assert str(report / name) in text
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        height, width, _ = matplotlib.image.imread(report / name).shape
        assert (width, height) == (500, 400)


# Two chains' points: (trial_id, T', lambda, gamma, val, test); c1's best point is T'=1.
CHAINS = [("c0", 0, 0.5, 0.60, 0.70, 0.72), ("c0", 1, 0.5, 0.60, 0.75, 0.74), ("c0", 2, 0.5, 0.60, 0.80, 0.79),
          ("c1", 0, 1.0, 0.80, 0.60, 0.66), ("c1", 1, 1.0, 0.80, 0.85, 0.70), ("c1", 2, 1.0, 0.80, 0.85, 0.81)]


def test_a_chain_study_reports_figure_4_and_each_chains_argmax_t_prime(tmp_path):
    rows = []
    for tid, t, lam, gamma, val, test in CHAINS:
        row = _trial_row(tid, "completed", t, lam if t else None, gamma, val, test)
        best = max(v for c, _, _, _, v, _ in CHAINS if c == tid)
        first = min(p for c, p, _, _, v, _ in CHAINS if c == tid and v == best)
        rows.append({**row, "best_point": t == first, "chain_status": "completed"})
    study = make_study(tmp_path, [], rounds="chain")
    _write(rows, study / "results" / "trials.parquet")
    text = write_report(str(study))
    table = text.split("at its best point on val_accuracy:\n")[1].split("\n\n")[0].splitlines()
    assert "argmax T'" in table[0]
    assert [line.split()[0] for line in table[1:]] == ["c1", "c0"]  # best first
    assert [int(line.split()[3]) for line in table[1:]] == [1, 2]  # c1 ties at 1 and 2: the first
    figure = study / "results" / "report" / "rounds.png"
    assert str(figure) in text
    height, width, _ = matplotlib.image.imread(figure).shape
    assert (width, height) == (1000, 400)  # validation and test panels


def test_a_study_saved_before_chains_reads_as_sampling_t_prime(tmp_path):
    study = make_study(tmp_path)
    text = (study / "space.yaml").read_text()
    (study / "space.yaml").write_text(text.replace("  rounds: param", ""))
    import yaml

    assert "rounds" not in yaml.safe_load((study / "space.yaml").read_text())["study"]
    assert StudyFolder(str(study)).space().chain is None


def test_no_completed_trials_still_reports(tmp_path):
    study = make_study(tmp_path, [t for t in TRIALS if t[1] != "completed"])
    text = write_report(str(study))
    assert "trials: 2 (0 completed, 1 stopped, 1 failed)" in text
    assert NAN_ERROR in text and "nothing to rank or plot" in text
    assert not (study / "results" / "report").exists()


def test_not_a_study(tmp_path):
    with pytest.raises(ConfigError, match="not a raysd study"):
        write_report(str(tmp_path))


def test_cli(study, tmp_path, capsys):
    from raysd.cli import main

    assert main(["report", str(study), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2 of 5 completed trials:" in out and "val_accuracy" in out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a raysd study" in capsys.readouterr().err


def _optuna_journal(study: Path, n: int = 24):
    """An Optuna journal beside the synthetic study, as `raysd tune` writes one: the value
    follows gamma and ignores T'."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study / "optuna.journal")))
    optuna_study = optuna.create_study(study_name=study.name, storage=storage, direction="maximize")
    space = {"mask_ratio": FloatDistribution(0.5, 0.9), "self_distill.rounds": IntDistribution(0, 3)}
    for i in range(n):
        params = {"mask_ratio": 0.5 + 0.4 * i / n, "self_distill.rounds": (i * 7) % 4}
        optuna_study.add_trial(optuna.trial.create_trial(
            params=params, distributions=space, value=params["mask_ratio"] ** 2))


def test_importances_come_from_the_studys_optuna_storage(study):
    from raysd.report import importances
    from raysd.spaces import load_space

    assert importances(str(study), load_space("demo")) is None  # no journal: no importances
    _optuna_journal(study)
    found = importances(str(study), load_space("demo"))
    assert found["mask_ratio"] > 0.9 > found["self_distill.rounds"]
    assert "parameter importances" in write_report(str(study))


def test_early_signal_is_each_trials_last_pretraining_stage_and_is_plotted(tmp_path):
    from raysd.report import early_signal

    study = make_study(tmp_path)
    trials = _trials(study)
    rounds = trials["param.self_distill.rounds"].fillna(0).astype(int)
    # the signal after θ_0 is noise; after the trial's last stage it orders trials like val
    trials["knn_accuracy_further_pretrain"] = 0.5
    for t in (1, 2):
        trials[f"knn_accuracy_self_distill_{t}"] = (trials.val_accuracy - 0.1).where(rounds >= t)
    trials.loc[rounds == 0, "knn_accuracy_further_pretrain"] = trials.val_accuracy - 0.1
    _write(trials.to_dict("records"), study / "results" / "trials.parquet")
    done = ranked(_trials(study), "val_accuracy", "max")
    assert early_signal(done, "val_accuracy").tolist() == pytest.approx((done.val_accuracy - 0.1).tolist())
    text = write_report(str(study))
    assert "Spearman +1.00 over 5 trials" in text
    for name in ("early_signal.png", "gamma_lambda.png"):
        image = matplotlib.image.imread(study / "results" / "report" / name)
        assert image.shape[0] > 100 and image.std() > 0


def test_ls_lists_studies_with_counts_and_best(tmp_path, capsys):
    from raysd.cli import main

    make_study(tmp_path)
    (tmp_path / "not-a-study").mkdir()
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines  # header and the one study
    fields = lines[1].split()
    assert fields[0] == "demo-20240101-000000" and fields[3:6] == ["5", "1", "1"]
    assert "val_accuracy 0.9000" in lines[1]
