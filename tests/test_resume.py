"""--resume's state without Ray: the Optuna search picks up an interrupted study as an
uninterrupted one would go on, and a study only Tune's pickles could resume is refused."""
from __future__ import annotations

import types
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from raysd import cli
from raysd.resume import TRIAL_ID, early_signals, fixed_configs, searched_id
from raysd.spaces import load_space
from raysd.study import _scheduler, _searcher
from test_report import make_study

# Two random start-up trials, then TPE: both of the sampler's generators are exercised.
SPACE = load_space("demo", {"study.n_startup_trials": 2, "study.rounds": "param"})


def _value(config: dict) -> float:
    """A stand-in for a trial's val_accuracy that depends on every parameter."""
    return round(config["mask_ratio"] + 0.1 * config["self_distill.rounds"]
                 + config.get("self_distill.mae_weight", 0.0), 6)


def _run(searcher, names: list[str]) -> list[dict]:
    """Suggest and complete one trial per name, one at a time (max_concurrent 1)."""
    configs = []
    for name in names:
        config = searcher.suggest(name)
        searcher.on_trial_complete(name, {**config, "val_accuracy": _value(config)})
        configs.append(config)
    return configs


def _row(config: dict, status: str = "completed") -> dict:
    return {"trial_id": config[TRIAL_ID], "status": status, "val_accuracy": _value(config)}


def test_a_chains_points_are_optuna_trials_of_their_own_that_move_no_id_or_proposal(tmp_path):
    """A chain study tells each point as a completed Optuna trial with T' among its params; the
    chains drawn after keep the ids and random start-up draws they would have without them.
    (Points are observations: they count towards TPE's start-up trials, so a study of few
    start-up trials turns to TPE sooner; here all are start-up draws.)"""
    chains = load_space("demo", {"study.n_startup_trials": 20})
    plain, told = (_searcher(chains, str(tmp_path / name), finished={}) for name in ("plain", "told"))
    for i in range(3):
        drawn = plain.suggest(f"p{i}")
        plain.on_trial_complete(f"p{i}", {**drawn, "val_accuracy": 0.5})
        config = told.suggest(f"t{i}")
        assert config == drawn and config[TRIAL_ID] == searched_id(i)
        assert "self_distill.rounds" not in config and "self_distill.mae_weight" in config  # at T'=2
        for t in (0, 1, 2, 2):  # the last: a point reported again (a restarted chain)
            told.on_trial_result(f"t{i}", {"points_done": t + 1, "rounds": t, "val_accuracy": 0.1 * t,
                                           "training_iteration": t + 1})
        told.on_trial_complete(f"t{i}", {**config, "val_accuracy": 0.2})
    trials = told._ot_study.get_trials()
    points = [t for t in trials if "raysd_point" in t.user_attrs]
    assert len(trials) == 12 and len(points) == 9  # 3 chains, each told its 3 points once
    for t in points:
        assert t.state == TrialState.COMPLETE and t.value == 0.1 * t.user_attrs["raysd_point"]
        assert t.params["self_distill.rounds"] == t.user_attrs["raysd_point"]
        # lambda is a parameter of a point only where it applies (when: rounds > 0)
        assert ("self_distill.mae_weight" in t.params) == (t.params["self_distill.rounds"] > 0)
    resumed = _searcher(chains, str(tmp_path / "told"), finished={})
    assert resumed.reruns == 3  # points are never run again; chains without a row are


def test_a_resumed_search_proposes_what_an_uninterrupted_one_would(tmp_path):
    """Three trials complete, a fourth is interrupted (its Optuna trial RUNNING); a fresh
    searcher on the same storage, as --resume builds it, runs the fourth again with its params
    and id, tells it once, and then proposes the uninterrupted study's fifth and sixth."""
    reference = _run(_searcher(SPACE, str(tmp_path / "ref"), finished={}), [f"r{i}" for i in range(6)])
    assert len({tuple(sorted(c.items())) for c in reference}) == 6
    assert [c[TRIAL_ID] for c in reference] == [searched_id(i) for i in range(6)]

    study = str(tmp_path / "cut")
    first = _searcher(SPACE, study, finished={})
    done = _run(first, ["a0", "a1", "a2"])
    assert done == reference[:3]
    interrupted = first.suggest("a3")  # the driver dies while this trial runs
    assert interrupted == reference[3]

    resumed = _searcher(SPACE, study, finished={c[TRIAL_ID]: _row(c) for c in done})
    assert resumed.reruns == 1
    assert _run(resumed, ["b0", "b1", "b2"]) == reference[3:]
    trials = optuna.load_study(study_name="cut", storage=resumed._ot_study._storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert [t.value for t in trials] == [_value(c) for c in reference]


def test_a_trial_the_killed_driver_left_half_drawn_runs_again_with_every_param(tmp_path):
    """The driver died between two of a trial's suggestions (seen in a chain study: its points
    lost mask_ratio): --resume runs it again with the param it had and the ones it lacked, drawn
    as an uninterrupted study draws them."""
    reference = _run(_searcher(SPACE, str(tmp_path / "ref"), finished={}), ["r0"])[0]
    study = str(tmp_path / "cut")
    first = _searcher(SPACE, study, finished={})
    half = first._ot_study.ask()  # the killed driver's trial: T' drawn, the rest never
    half.suggest_int("self_distill.rounds", 0, 2)
    assert set(half.params) == {"self_distill.rounds"}
    resumed = _searcher(SPACE, study, finished={})
    assert resumed.reruns == 1
    config = resumed.suggest("b0")
    assert set(config) - {TRIAL_ID} == set(reference) - {TRIAL_ID} - (
        set() if config["self_distill.rounds"] > 0 else {"self_distill.mae_weight"})
    assert 0.5 <= config["mask_ratio"] <= 0.9  # drawn from its range, not left out
    assert config["self_distill.rounds"] == half.params["self_distill.rounds"]  # kept, not redrawn


def test_a_trial_recorded_but_never_told_is_told_once_and_not_run_again(tmp_path):
    """The driver died between recording a trial and telling Optuna: --resume tells Optuna
    the recorded value and runs the trials Optuna knows that have no final row (a failed one)."""
    study = str(tmp_path / "told")
    first = _searcher(SPACE, study, finished={})
    ended = _run(first, ["a0"])
    recorded = first.suggest("a1")  # recorded as completed; the driver died before the tell
    failed = first.suggest("a2")
    first.on_trial_complete("a2", error=True)
    finished = {c[TRIAL_ID]: _row(c) for c in [*ended, recorded]}
    resumed = _searcher(SPACE, study, finished=finished)
    trials = resumed._ot_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].value == _value(recorded)
    assert resumed.reruns == 1 and resumed.suggest("b0") == failed  # retried, as Tune did
    resumed.on_trial_complete("b0", {**failed, "val_accuracy": 0.5})  # Optuna keeps its FAIL
    assert resumed._ot_study.get_trials()[2].state == TrialState.FAIL


def test_fixed_trials_have_ids_a_folder_can_hold():
    variants = [{"variant": "self_distill T'=1", "values": {"seed": s}} for s in (0, 1)]
    variants.append({"variant": "finetune", "values": {"seed": 0}})
    assert [c[TRIAL_ID] for c in fixed_configs(3, variants)] == [
        "self_distill_T_1-s0", "self_distill_T_1-s1", "finetune-s0"]
    assert [c[TRIAL_ID] for c in fixed_configs(2, None)] == ["trial_0000", "trial_0001"]


def test_a_study_only_tunes_pickles_could_resume_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A study started before raysd resumed from its own files (no state_format in study.yaml)
    is refused before Ray starts: exit 2, one line."""
    study = make_study(tmp_path)
    (study / "study.yaml").write_text(yaml.safe_dump({"space": "demo", "raysd": "0.1.0"}))
    monkeypatch.setattr(cli, "_drive", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert cli.main(["tune", "--resume", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no longer loads" in err and str(study) in err


def test_asha_rungs_refilled_from_the_history_stop_a_weak_trial_and_count_a_rerun_once():
    """A fresh scheduler knows nothing of the trials that ended before --resume; replayed from
    the history's early signals it stops a trial below their cutoff, and a trial run again that
    reports a rung it had reached is not counted twice."""
    rows = [{"trial_id": "a", "stage": "further_pretrain", "round": 0, "progress": 4, "knn_accuracy": 0.9},
            {"trial_id": "a", "stage": "further_pretrain", "round": 0, "progress": 4, "knn_accuracy": 0.9},
            {"trial_id": "a", "stage": "finetune", "round": 0, "progress": 12, "loss": 0.3},
            {"trial_id": "b", "stage": "self_distill", "round": 1, "progress": 8, "knn_accuracy": 0.7},
            {"trial_id": "b", "stage": "further_pretrain", "round": 0, "progress": 4, "knn_accuracy": 0.8}]
    assert early_signals(rows) == {"a": [0.9], "b": [0.8, 0.7]}
    scheduler = _scheduler(load_space("demo", {"study.scheduler": {"type": "asha", "grace_period": 1},
                                               "study.rounds": "param"}))
    scheduler.replay(early_signals(rows))
    weak, rerun = (types.SimpleNamespace(config={TRIAL_ID: tid}) for tid in ("c", "b"))
    for trial in (weak, rerun):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, weak, {"stages_done": 1, "knn_accuracy": 0.5}) == "STOP"
    assert scheduler.on_trial_result(None, rerun, {"stages_done": 1, "knn_accuracy": 0.8}) == "CONTINUE"
    assert sorted(scheduler._brackets[0]._rungs[-1][1]) == ["a", "b", "c"]


def test_a_chains_rungs_are_its_points_on_the_validation_metric():
    """In a chain study ASHA compares chains at the same T' on the study's metric, refilled on
    --resume from the history's point rows (a point's row written twice counts once)."""
    from raysd.resume import chain_rungs

    rows = [{"trial_id": "a", "stage": "finetune", "round": 0, "points_done": 1, "val_accuracy": 0.9},
            {"trial_id": "a", "stage": "finetune", "round": 0, "points_done": 1, "val_accuracy": 0.9},
            {"trial_id": "a", "stage": "finetune", "round": 0, "step": 4, "val_accuracy": 0.1},  # mid-tune
            {"trial_id": "b", "stage": "finetune", "round": 1, "points_done": 2, "val_accuracy": 0.6},
            {"trial_id": "b", "stage": "finetune", "round": 0, "points_done": 1, "val_accuracy": 0.8}]
    assert chain_rungs(rows, "val_accuracy") == {"a": [0.9], "b": [0.8, 0.6]}
    scheduler = _scheduler(load_space("demo", {"study.scheduler": {"type": "asha", "grace_period": 1}}))
    scheduler.replay(chain_rungs(rows, "val_accuracy"))
    weak, strong = (types.SimpleNamespace(config={TRIAL_ID: tid}) for tid in ("c", "d"))
    for trial in (weak, strong):
        scheduler.on_trial_add(None, trial)
    # a k-NN signal or a validation row inside a fine-tune is no rung
    assert scheduler.on_trial_result(None, weak, {"stages_done": 1, "knn_accuracy": 0.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, weak, {"val_accuracy": 0.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, weak, {"points_done": 1, "val_accuracy": 0.5}) == "STOP"
    assert scheduler.on_trial_result(None, strong, {"points_done": 1, "val_accuracy": 0.95}) == "CONTINUE"


def test_the_demos_first_random_draws_cover_every_t_prime(tmp_path):
    """demo.yaml's claim for its study.seed, under SeededTPESampler: with T' sampled
    (study.rounds: param) its first three trials (the demo's random start-up) have T' = 0, 1
    and 2, at three mask ratios."""
    demo = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"  # this checkout's
    searcher = _searcher(load_space(str(demo), {"study.rounds": "param"}), str(tmp_path / "demo"), finished={})
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    assert sorted(c["self_distill.rounds"] for c in first) == [0, 1, 2]
    assert len({c["mask_ratio"] for c in first}) == 3
