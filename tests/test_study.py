"""A real study on a real local Ray: Parquet read back with pyarrow, TensorBoard with its reader."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import TINY, kill_processes_mentioning, plant_pickles, wait_for_other_drivers
from raysd import cli


@pytest.fixture(scope="session")  # session: never torn down and rebuilt between its tests
def demo_study(ray_local, tmp_path_factory):
    """A 2-chain study (demo runs T' in 0..2 as chains: 6 points), also logged to MLflow (a
    file store) and W&B (offline); its console output is kept for the progress-line test."""
    import raysd.console

    storage = tmp_path_factory.mktemp("storage")
    trackers = {"WANDB_MODE": "offline", "WANDB_DIR": str(storage), "WANDB_SILENT": "true"}
    saved = {k: os.environ.get(k) for k in trackers}
    os.environ.update(trackers)
    raysd.console.PROGRESS_SECONDS, every = 2, raysd.console.PROGRESS_SECONDS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(["tune", "--space", "demo", *TINY, "--num-samples", "2",
                             "--storage", str(storage), "--name", "demo",
                             "--logger", "mlflow", "--logger", "wandb"])
    finally:
        raysd.console.PROGRESS_SECONDS = every
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    print(out.getvalue())
    return code, storage / "demo", out.getvalue()


def test_study_writes_one_row_per_point_with_params_metrics_and_cost(demo_study):
    code, study, _ = demo_study
    assert code == 0
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    # two chains, each a row per point T' = 0, 1, 2
    assert len(trials) == 6 and trials.trial_id.nunique() == 2
    assert not trials.duplicated(["trial_id", "param.self_distill.rounds"]).any()
    for _, chain in trials.groupby("trial_id"):
        assert sorted(chain["param.self_distill.rounds"]) == [0, 1, 2]
        assert chain["param.mask_ratio"].nunique() == 1  # one (gamma, lambda) per chain
        # the chain's best point on validation is marked (ties: the smaller T')
        best = chain[chain.best_point]
        assert len(best) == 1 and best.val_accuracy.iloc[0] == chain.val_accuracy.max()
        assert best["param.self_distill.rounds"].iloc[0] == chain[
            chain.val_accuracy == chain.val_accuracy.max()]["param.self_distill.rounds"].min()
        # a point's cost is its own stages: round 2's key only at T' = 2
        assert chain.set_index("param.self_distill.rounds").key_self_distill_2.notna().tolist() == [False, False, True]
        assert chain.steps_finetune.notna().all()
    assert set(trials.status) == {"completed"} and set(trials.chain_status) == {"completed"}
    for column in ("param.self_distill.rounds", "param.mask_ratio", "val_accuracy", "test_accuracy",
                   "seconds_finetune", "steps_finetune", "cfg.seed", "raysd_version", "wall_seconds",
                   "init_distance", "gen_gap"):
        assert column in trials.columns, column
    assert trials["param.mask_ratio"].nunique() == 2  # the search did vary gamma
    assert trials["cfg.mask_ratio"].tolist() == trials["param.mask_ratio"].tolist()
    assert trials["cfg.self_distill.rounds"].tolist() == trials["param.self_distill.rounds"].tolist()
    assert trials.val_accuracy.between(0, 1).all() and trials.test_accuracy.between(0, 1).all()
    # mae_weight is searched only when rounds > 0: empty exactly where rounds == 0
    rounds0 = trials["param.self_distill.rounds"] == 0
    assert trials.loc[rounds0, "param.self_distill.mae_weight"].isna().all()
    assert trials.loc[~rounds0, "param.self_distill.mae_weight"].notna().all()


def test_history_has_every_stage_and_round_of_every_trial(demo_study):
    _, study, _ = demo_study
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    history = pq.read_table(study / "results" / "history").to_pandas()
    assert set(history.trial_id) == set(trials.trial_id)
    for _, trial in trials.iterrows():
        rows = history[history.trial_id == trial.trial_id]
        rounds = int(trial["param.self_distill.rounds"])
        assert set(rows.stage) == {"further_pretrain", "self_distill", "finetune"}  # a chain: all
        assert set(rows[rows.stage == "self_distill"]["round"]) == {1, 2}
        assert rows.progress.is_monotonic_increasing
        # the point's own fine-tune, and its row with the point's final metrics
        tuned = rows[(rows.stage == "finetune") & (rows["round"] == rounds)]
        assert tuned.val_accuracy.notna().any()
        point = tuned[tuned.points_done.notna()]
        assert len(point) == 1 and point.points_done.iloc[0] == rounds + 1
        assert point.val_accuracy.iloc[0] == trial.val_accuracy


def test_tensorboard_scalars_and_hparams_read_back(demo_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, study, _ = demo_study
    history = pq.read_table(study / "results" / "history").to_pandas()
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    for _, trial in trials.iterrows():
        acc = EventAccumulator(str(study / "tensorboard" / trial.trial_id))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "further_pretrain/mae_loss" in tags and "finetune/ce_loss" in tags
        ce = history[(history.trial_id == trial.trial_id) & (history.stage == "finetune")]
        logged = {e.step: e.value for e in acc.Scalars("finetune/ce_loss")}
        assert logged == pytest.approx(dict(zip(ce.progress, ce.ce_loss)), rel=1e-5)
        point = EventAccumulator(str(study / "tensorboard" / trial.trial_id /
                                     f"rounds_{trial['param.self_distill.rounds']}"))
        point.Reload()
        assert "final/val_accuracy" in point.Tags()["scalars"] and "final/test_accuracy" in point.Tags()["scalars"]
        assert point.Scalars("final/val_accuracy")[-1].value == pytest.approx(trial.val_accuracy, rel=1e-6)


def test_one_hparams_experiment_declares_every_searched_param_and_final_metric(demo_study):
    """TensorBoard uses one experiment tag for its HParams tab: a T'=0 point (no lambda) must
    not be the one that declares the columns. Every point is a session."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    _, study, _ = demo_study
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    point_runs = [f"{t}/rounds_{r}" for t, r in zip(trials.trial_id, trials["param.self_distill.rounds"])]
    runs = {".": study / "tensorboard", **{t: study / "tensorboard" / t for t in trials.trial_id},
            **{p: study / "tensorboard" / p for p in point_runs}}
    experiments, sessions = {}, {}
    for run, path in runs.items():
        acc = EventAccumulator(str(path))
        acc.Reload()
        try:
            plugins = acc.PluginTagToContent("hparams")
        except KeyError:  # a run without HParams data
            plugins = {}
        if metadata.EXPERIMENT_TAG in plugins:
            experiments[run] = metadata.parse_experiment_plugin_data(plugins[metadata.EXPERIMENT_TAG])
        if metadata.SESSION_START_INFO_TAG in plugins:
            sessions[run] = metadata.parse_session_start_info_plugin_data(
                plugins[metadata.SESSION_START_INFO_TAG])
    assert list(experiments) == ["."]  # one experiment, at the root
    declared = {h.name for h in experiments["."].hparam_infos}
    assert {"mask_ratio", "self_distill.rounds", "self_distill.mae_weight", "status"} <= declared
    metrics = {m.name.tag for m in experiments["."].metric_infos}
    assert {"final/val_accuracy", "final/test_accuracy", "final/gen_gap"} <= metrics
    assert set(sessions) == set(point_runs)  # every point is one session of it
    for run, (_, trial) in zip(point_runs, trials.iterrows()):
        hparams = dict(sessions[run].hparams)
        assert set(hparams) <= declared
        assert hparams["mask_ratio"].number_value == pytest.approx(trial["param.mask_ratio"])
        assert hparams["self_distill.rounds"].number_value == trial["param.self_distill.rounds"]
        assert ("self_distill.mae_weight" in hparams) == (trial["param.self_distill.rounds"] > 0)
        assert hparams["status"].string_value == "completed"


def test_optuna_storage_holds_the_study_as_trials_parquet_does(demo_study):
    import math

    import optuna
    from optuna.storages.journal import JournalFileBackend

    _, study, _ = demo_study
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study / "optuna.journal")))
    loaded = optuna.load_study(study_name="demo", storage=storage)
    complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # Every point is a completed trial with T' among its params; each chain's own Optuna trial
    # (T' not sampled) is told its best point.
    finished = [t for t in complete if "raysd_point" in t.user_attrs]
    chains = [t for t in complete if "raysd_point" not in t.user_attrs]
    assert len(finished) == len(trials) and len(chains) == trials.trial_id.nunique()
    assert {(t.user_attrs["raysd_chain"], t.user_attrs["raysd_point"]) for t in finished} == set(
        zip(trials.trial_id, trials["param.self_distill.rounds"]))
    assert all("self_distill.rounds" in t.params for t in finished)
    assert not any("self_distill.rounds" in t.params for t in chains)
    assert len(loaded.trials) == len(complete)  # none left running
    recorded = sorted((t.value, sorted(t.params.items())) for t in finished)
    expected = sorted((row.val_accuracy, sorted((k[len("param."):], v) for k, v in row.items()
                                                if k.startswith("param.") and not (isinstance(v, float) and math.isnan(v))))
                      for _, row in trials.iterrows())
    assert [v for v, _ in recorded] == pytest.approx([v for v, _ in expected])
    assert [p for _, p in recorded] == [p for _, p in expected]
    # a chain's raysd id is its place among the trials the sampler drew (what --resume relies
    # on); the points told between them do not count
    best = trials[trials.best_point]
    assert {f"trial_{i:04d}": t.value for i, t in enumerate(sorted(chains, key=lambda t: t.number))} == dict(
        zip(best.trial_id, best.val_accuracy))


def test_progress_lines_while_trials_run_and_one_output_layout(demo_study):
    import re

    _, study, out = demo_study
    line = re.compile(r"trial \w+ (further_pretrain|self_distill round \d/\d|finetune) "
                      r"step \d+/\d+, \d+ samples/s, ETA \d+")
    assert any(line.search(text) for text in out.splitlines()), out
    assert re.search(r"1/2 finished.*\| ETA \d", out)
    # Tune's automatic loggers are off: no second copy of the rows in its trial folders
    copies = [p.name for d in study.glob("trial_driver_*") for p in d.iterdir()
              if p.name in ("result.json", "progress.csv") or p.name.startswith("events.out")]
    assert not copies


def test_mlflow_and_wandb_get_params_and_metrics(demo_study):
    import mlflow

    _, study, _ = demo_study
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    mlflow.set_tracking_uri(f"sqlite:///{study / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["demo"])
    assert len(runs) == 2  # one per chain, whose final metric is its best point's
    assert sorted(runs["metrics.val_accuracy"]) == pytest.approx(sorted(trials[trials.best_point].val_accuracy))
    assert sorted(runs["params.mask_ratio"].astype(float)) == pytest.approx(
        sorted(trials[trials.best_point]["param.mask_ratio"]))
    # W&B offline: one run per trial, named by its id. This wandb has no Python reader of its
    # transaction log, so the check is that the params and the stage rows were written into it.
    # (Under heavy load one run's log once ended before its fine-tuning rows: Ray's W&B logging
    # actor, not raysd, decides when a run is flushed; README says so.)
    offline = {run.name.rsplit("-", 1)[1]: run for run in (study.parent / "wandb").glob("offline-run-*")}
    assert set(offline) == set(trials.trial_id)
    for run in offline.values():
        log = next(run.glob("run-*.wandb")).read_bytes()
        assert b"mask_ratio" in log and b"mae_loss" in log


def test_failed_trial_is_recorded_with_its_reason(diverged_trial):
    """The session's diverged run (test_faults checks it was not retried)."""
    assert diverged_trial.code == 1
    row = pq.read_table(diverged_trial.study / "results" / "trials.parquet").to_pylist()[0]
    assert row["status"] == "failed"
    assert "NonFiniteLoss" in row["error"] and "further_pretrain round 0 step" in row["error"]
    assert "FAILED" in diverged_trial.out


def test_single_run_with_two_ddp_workers(slow_round_reference):
    """The session's 2-worker reference trial (test_faults and test_multinode compare against
    it); `--method` is checked on the wheel's trial in test_packaging."""
    row = slow_round_reference
    assert row["status"] == "completed" and row["cfg.resources.workers"] == 2


def _raysd(*args, env):
    return subprocess.Popen([sys.executable, "-m", "raysd.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


# Not strict: a kill that lands while the driver draws a trial's params leaves them half drawn;
# --resume now draws the rest (test_resume.py::test_a_trial_the_killed_driver_left_half_drawn_
# runs_again_with_every_param), but not necessarily as the uninterrupted study did, so the
# bit-for-bit comparison below can then differ (seen once under heavy load; issue 21's note).
@pytest.mark.xfail(strict=False, reason="a kill mid-draw redraws a trial's missing params")
def test_resume_after_the_driver_is_killed(demo_study, ray_local, tmp_path):
    """SIGKILL mid-study, then --resume: the trials that finished are not run again, the one
    that was running resumes under its own id, no history row twice, every Optuna trial told
    once - without unpickling anything in the study folder; and each trial's metrics are
    bit-identical to the uninterrupted demo study's (the same seed proposes the same params).
    Both drivers run on the session's Ray (--address; the resumed one in this process): Ray
    ends the killed driver's trials with it, and no Ray start is paid twice."""
    ray_tmp = tempfile.mkdtemp(prefix="rsd", dir="/tmp")  # short: Ray's socket paths are length-limited
    # history parts written at every step: the killed driver leaves the running trial's rows
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYSD_HISTORY_PART_SECONDS": "0"}
    storage, study = tmp_path / "s", tmp_path / "s" / "resume"
    # Random start-up draws only, as in the demo study (whose 2 chains start at once): with one
    # chain at a time, the first chain's points would turn the second's draw to TPE.
    args = ["tune", "--space", "demo", *TINY, "--num-samples", "2", "--max-concurrent", "1",
            "--set", "study.n_startup_trials=10", "--storage", str(storage), "--name", "resume",
            "--address", ray_local.get_runtime_context().gcs_address]
    try:
        driver = _raysd(*args, env=env)
        deadline = time.time() + 400
        trials = study / "results" / "trials.parquet"
        while not trials.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(1)
        assert trials.exists(), driver.communicate()[0][-3000:] if driver.poll() is not None else "timeout"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, mid-study
        driver.wait()
        wait_for_other_drivers(ray_local)  # its running trial ended with it
        done_before = pq.read_table(trials).to_pandas()
        assert done_before.trial_id.nunique() == 1 and len(done_before) == 3  # one chain's points
        marker = tmp_path / "unpickled"
        assert "tuner.pkl" in plant_pickles(study, marker)  # what Tuner.restore unpickled
    finally:
        kill_processes_mentioning(ray_tmp)
    assert cli.main(["tune", "--resume", str(study)]) == 0
    after = pq.read_table(trials).to_pandas()
    assert len(after) == 6 and after.trial_id.nunique() == 2
    assert not after.duplicated(["trial_id", "param.self_distill.rounds"]).any()
    assert set(after.status) == {"completed"}
    # the chain that finished before the kill was not rerun
    for _, row in done_before.iterrows():
        again = after[(after.trial_id == row.trial_id) & (after["param.self_distill.rounds"]
                                                          == row["param.self_distill.rounds"])].iloc[0]
        assert again.wall_seconds == row.wall_seconds and again.val_accuracy == row.val_accuracy
    history = pq.read_table(study / "results" / "history").to_pandas()
    assert set(history.trial_id) == set(after.trial_id)
    identity = ["trial_id", "stage", "round", "step", "attempt"]
    assert not history.duplicated(identity).any()  # --resume never duplicates a row
    assert not (study / "results" / "history.parquet").exists()  # appended, never one file
    # --resume continued the same Optuna study: every trial told once, none left running
    import optuna
    from optuna.storages.journal import JournalFileBackend

    loaded = optuna.load_study(study_name="resume", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(study / "optuna.journal"))))
    states = [t.state for t in loaded.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 + 6, states  # chains and points
    assert len(states) == 8  # none failed or left RUNNING, no point told twice
    points = [t for t in loaded.trials if "raysd_point" in t.user_attrs]
    assert sorted(t.value for t in points) == pytest.approx(sorted(after.val_accuracy))
    assert not marker.exists()  # --resume unpickled nothing from the study folder
    # Interrupted or not, the same trials with the same params give the same numbers, bit for bit.
    _, reference, _ = demo_study
    point = ["trial_id", "param.self_distill.rounds"]
    reference = pq.read_table(reference / "results" / "trials.parquet").to_pandas().set_index(point)
    after = after.set_index(point)
    assert sorted(after.index) == sorted(reference.index)
    compared = [c for c in reference.columns if c.startswith(("param.", "val_", "test_", "knn_accuracy_"))
                or c in ("init_distance", "gen_gap", "steps_finetune", "best_point")]
    assert "val_accuracy" in compared and "param.mask_ratio" in compared
    pd.testing.assert_frame_equal(after.loc[reference.index, compared], reference[compared],
                                  check_exact=True)


def test_ctrl_c_exits_130_with_the_resume_hint_and_no_best_line(ray_local, tmp_path):
    """A driver on the session's Ray (--address: no Ray of its own to start) gets Ctrl-C while
    a trial trains."""
    ray_tmp = tempfile.mkdtemp(prefix="rsd", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    study = tmp_path / "stopped"
    driver = subprocess.Popen([sys.executable, "-m", "raysd.cli", "tune", "--space", "demo", *TINY,
                               "--num-samples", "3", "--max-concurrent", "1", "--storage", str(tmp_path),
                               "--name", "stopped", "--address", ray_local.get_runtime_context().gcs_address],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(study.glob("train/*/checkpoint_*")):
            time.sleep(0.5)  # a trial is training
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = driver.communicate(timeout=300)
        wait_for_other_drivers(ray_local)
    finally:
        kill_processes_mentioning(ray_tmp)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    assert f"raysd tune --resume {study}" in err
    assert "best trial" not in out
    # The interrupted trial's Optuna trial is left RUNNING, for --resume to run and tell once.
    import optuna
    from optuna.storages.journal import JournalFileBackend

    loaded = optuna.load_study(study_name="stopped", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(study / "optuna.journal"))))
    assert loaded.trials[-1].state == optuna.trial.TrialState.RUNNING, loaded.trials


def test_asha_on_the_early_signal_never_stops_a_trial_for_its_t_prime(ray_local, tmp_path):
    """T' in {0, 1, 2} at one (gamma, lambda), T' sampled (study.rounds: param): trials share
    every stage they have in common, so their signals tie at every rung and only length could
    set them apart. None is stopped, the T'=2 trial fine-tunes, and the shared stages were
    trained once across concurrent trials."""
    code = cli.main(["tune", "--space", "demo", *TINY, "--num-samples", "3", "--max-concurrent", "3",
                     "--set", "study.rounds=param",
                     "--set", "search.mask_ratio=none", "--set", "search.self_distill.mae_weight=none",
                     "--set", "study.seed=2", "--set", "study.n_startup_trials=4",
                     "--set", "study.scheduler={type: asha, grace_period: 1, reduction_factor: 2}",
                     "--storage", str(tmp_path), "--name", "asha"])
    assert code == 0
    trials = pq.read_table(tmp_path / "asha" / "results" / "trials.parquet").to_pandas()
    assert sorted(trials["param.self_distill.rounds"]) == [0, 1, 2]
    assert set(trials.status) == {"completed"} and trials.val_accuracy.notna().all()
    # One trial trained theta_0 and round 1; the others waited on its lease and loaded them.
    assert (~trials.reused_further_pretrain.astype(bool)).sum() == 1
    assert trials.key_further_pretrain.nunique() == 1
    with_round = trials[trials["param.self_distill.rounds"] >= 1]
    assert (~with_round.reused_self_distill_1.astype(bool)).sum() == 1
    assert trials.knn_accuracy_further_pretrain.nunique() == 1
    history = pq.read_table(tmp_path / "asha" / "results" / "history").to_pandas()
    signals = history[history.knn_accuracy.notna()]
    assert set(signals.stage) == {"further_pretrain", "self_distill"}


def test_the_best_trials_model_is_kept_and_exports_to_transformers(demo_study, tmp_path, digits):
    """keep_models=best (the default) and `raysd export`: the exported folder loads in
    transformers and gives the logits of raysd's own model of that trial."""
    import torch
    from transformers import ViTForImageClassification

    from raysd.export import load_classifier
    from raysd.study_folder import ranked

    _, study, _ = demo_study
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    top = ranked(trials, "val_accuracy", "max").iloc[0]
    best = top.trial_id
    assert [p.name for p in (study / "models").iterdir()] == [best]
    out = tmp_path / "exported"
    assert cli.main(["export", str(study), str(out)]) == 0
    ours, meta = load_classifier(str(study / "models" / best))
    hf = ViTForImageClassification.from_pretrained(out).eval()
    images = torch.stack([digits.test[i]["x"] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images).logits, ours({"x": images}),
                                   rtol=1e-4, atol=1e-5)
    assert hf.config.id2label == {i: str(i) for i in range(10)}  # the digits' own names
    card = (out / "README.md").read_text()
    assert best in card and "mask_ratio" in card and "val_accuracy" in card
    assert cli.main(["export", str(study), str(tmp_path / "x"), "--trial", "nope"]) == 2
    # a chain keeps the model of its best point: that point is named ID@T', another is refused
    t = int(top["param.self_distill.rounds"])
    assert meta["metrics"]["rounds"] == t and "self_distill.rounds" in card
    other = next(r for r in (0, 1, 2) if r != t)
    assert cli.main(["export", str(study), str(tmp_path / "y"), "--trial", f"{best}@{other}"]) == 2
