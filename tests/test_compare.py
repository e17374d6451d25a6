"""raysd compare: which trials it runs under each protocol, the table it prints (paired
t-intervals, the self_distill - further_pretrain contrast, the protocol), the paper's figures
report draws from it, a fine-tuning seed over one pre-training, and one real side-by-side run."""
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from scipy import stats

from conftest import tiny_config
from helpers import TINY, kill_processes_mentioning, plant_pickles, wait_for_other_drivers
from raysd import cli, models
from raysd.compare import (method_variants, pair_column, protocol_of, summary_table, table_text,
                           trial_variants, write_table)
from raysd.compare_plots import figure4, paper_figures, rounds_curves
from raysd.config import METHODS
from raysd.errors import ConfigError
from raysd.resume import TRIAL_ID, fixed_configs
from raysd.storage import Store
from test_report import make_study


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


def test_any_method_runs_and_each_protocol_varies_its_own_seed():
    assert [v["variant"] for v in method_variants(list(METHODS), [], seeds=1)] == list(METHODS)
    full = method_variants(["finetune"], [], seeds=2, first_seed=3)
    assert [v["values"] for v in full] == [{"method": "finetune", "seed": 3}, {"method": "finetune", "seed": 4}]
    # reference: one pre-training (seed = the first seed), fine-tuning over the seeds
    ref = method_variants(["finetune", "self_distill"], [], seeds=2, protocol="reference", first_seed=3)
    assert [v["values"] for v in ref[:2]] == [{"method": "finetune", "seed": 3, "finetune.seed": 3},
                                              {"method": "finetune", "seed": 3, "finetune.seed": 4}]
    assert protocol_of(full) == "full" and protocol_of(ref) == "reference" and protocol_of(None) == "full"
    assert pair_column("full") == "seed" and pair_column("reference") == "cfg.finetune.seed"
    ids = [c[TRIAL_ID] for c in fixed_configs(len(ref), ref)]
    assert ids == ["finetune-s3-f3", "finetune-s3-f4", "self_distill-s3-f3", "self_distill-s3-f4"]
    for kwargs, message in (({"seeds": 0}, "--seeds 0: at least 1"),
                            ({"seeds": 1, "first_seed": -1}, "--first-seed -1: must be >= 0"),
                            ({"seeds": 1, "protocol": "ref"}, "--protocol ref: use full or reference")):
        with pytest.raises(ConfigError, match=message):
            method_variants(["finetune"], [], **kwargs)


def test_from_a_study_the_first_seed_keeps_its_own_run_out():
    trials = pd.DataFrame({"trial_id": ["a", "b"], "status": ["completed"] * 2,
                           "val_accuracy": [0.5, 0.9], "param.mask_ratio": [0.6, 0.75]})
    variants = trial_variants(trials, "val_accuracy", "max", top=1, seeds=2, protocol="reference",
                              first_seed=1)
    assert [v["values"] for v in variants] == [{"mask_ratio": 0.75, "seed": 1, "finetune.seed": 1},
                                               {"mask_ratio": 0.75, "seed": 1, "finetune.seed": 2}]


def _scores(rng, seeds, base=None, gain=0.0):
    """A test metric per seed: seed noise shared with `base` (when given), so pairing matters."""
    return {s: (base[s] if base else 0.5 + 0.2 * rng.random()) + gain + 0.03 * rng.random() for s in seeds}


def _rows(scores: dict, method: dict, pair_on: str, fixed: dict | None = None) -> pd.DataFrame:
    rows = [{"variant": v, "method": method[v], "status": "completed", pair_on: s, **(fixed or {}),
             "val_accuracy": x, "test_accuracy": x, "init_distance": 1.0, "gen_gap": 0.1}
            for v, per_seed in scores.items() for s, x in per_seed.items()]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # rows in no seed order


def _interval(a: dict, b: dict) -> str:
    """An independent paired 95 % t-interval: scipy's, over the seeds both ran."""
    seeds = sorted(set(a) & set(b))
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    return f"{np.mean(np.subtract(x, y)):+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"


def test_paired_interval_is_scipys_paired_t_interval_over_the_seeds_both_ran():
    rng = np.random.default_rng(0)
    finetune = _scores(rng, range(4))
    distill = {**_scores(rng, range(4), finetune, gain=0.02), 9: 0.99}  # seed 9: no pair, left out
    table = summary_table(_rows({"finetune": finetune, "self_distill": distill},
                                {"finetune": "finetune", "self_distill": "self_distill"}, "seed"),
                          "val_accuracy", "finetune").set_index("variant")
    assert table.loc["self_distill", "test_accuracy - finetune"] == _interval(distill, finetune)
    assert table.loc["finetune", "test_accuracy - finetune"] == "(baseline)"
    assert table.loc["self_distill", "n"] == 5
    assert "test_accuracy - further_pretrain" not in table.columns  # further_pretrain did not run


def test_self_distill_is_also_paired_against_further_pretrain_by_fine_tuning_seed():
    """reference protocol: one pre-training seed, so trials pair by their fine-tuning seed; the
    table says which protocol made it."""
    rng = np.random.default_rng(1)
    finetune = _scores(rng, range(3))
    further = _scores(rng, range(3), finetune, gain=0.01)
    scores = {"finetune": finetune, "further_pretrain": further,
              "self_distill T'=1": _scores(rng, range(3), further, gain=0.02),
              "self_distill T'=2": _scores(rng, range(3), further, gain=0.03)}
    method = {v: v.split()[0] for v in scores}
    rows = _rows(scores, method, "cfg.finetune.seed", fixed={"seed": 7})
    table = summary_table(rows, "val_accuracy", "finetune", pair_column("reference")).set_index("variant")
    column = "test_accuracy - further_pretrain"
    for variant in ("self_distill T'=1", "self_distill T'=2"):
        assert table.loc[variant, column] == _interval(scores[variant], further)
        assert table.loc[variant, "test_accuracy - finetune"] == _interval(scores[variant], finetune)
    assert table.loc["further_pretrain", column] == "(baseline)" and table.loc["finetune", column] == ""
    labels = list(scores)
    text = table_text(rows, "val_accuracy", labels, "reference")
    assert "against finetune, and self_distill against further_pretrain" in text
    assert "protocol reference: one pre-training seed" in text and "protocol full" not in text
    assert "fine-tuning's randomness alone" in text
    full = table_text(_rows(scores, method, "seed"), "val_accuracy", labels, "full")
    assert "protocol full: every stage ran once per seed" in full and "protocol reference" not in full


def test_the_table_reads_its_protocol_from_the_studys_variants(tmp_path):
    study = tmp_path / "cmp"
    variants = method_variants(["finetune", "self_distill"], [], seeds=2, protocol="reference")
    store = Store(str(study))
    store.write_text(yaml.safe_dump({"compare": ["finetune", "self_distill"], "variants": variants}),
                     "study.yaml")
    rows = [{"trial_id": f"{v['variant']}{i}", "status": "completed", "variant": v["variant"],
             "method": v["variant"], "seed": 0, "cfg.finetune.seed": v["values"]["finetune.seed"],
             "val_accuracy": 0.5 + i / 10, "test_accuracy": 0.4 + i / 7, "init_distance": 1.0,
             "gen_gap": 0.1} for i, v in enumerate(variants)]
    store.write_rows(rows, "results", "trials.parquet")
    text = write_table(str(study), "val_accuracy")
    assert "protocol reference" in text and (study / "results" / "compare.txt").read_text() == text
    assert "+0.2857 (n=2)" not in text and "n/a" not in text  # paired by finetune.seed, not seed


def _comparison_rows(rounds=(1, 2), seeds=(0, 1)) -> pd.DataFrame:
    """trials.parquet rows of `compare --methods finetune,further_pretrain,self_distill --rounds`."""
    rows = []
    for method, t in [("finetune", None), ("further_pretrain", None), *(("self_distill", r) for r in rounds)]:
        for s in seeds:
            test = 0.5 + 0.1 * (method != "finetune") + 0.05 * (t or 0) + 0.01 * s
            rows.append({"trial_id": f"{method}{t}-s{s}", "status": "completed",
                         "variant": method if t is None else f"{method} T'={t}", "method": method,
                         "seed": s, "param.method": method, "param.seed": s,
                         "param.self_distill.rounds": t, "cfg.self_distill.rounds": 1 if t is None else t,
                         "val_accuracy": test, "test_accuracy": test + 0.1, "gen_gap": 0.2 - 0.01 * (t or 0),
                         "init_distance": 3.0 - (t or 0)})
    return pd.DataFrame(rows)


def test_figure_4_plots_the_test_metric_against_the_rounds_that_varied():
    rows = _comparison_rows(rounds=(1, 2, 3))
    assert list(rounds_curves(rows)) == ["self_distill"]
    line = figure4(rows, "val_accuracy").axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2, 3]
    expected = [rows[(rows["cfg.self_distill.rounds"] == t) & (rows["method"] == "self_distill")]
                ["test_accuracy"].mean() for t in (1, 2, 3)]
    assert np.allclose(line.get_ydata(), expected)
    # No --rounds: one T' per method, nothing to draw against T'; Figure 5 still is.
    assert list(paper_figures(_comparison_rows(rounds=(1,)), "val_accuracy")) == ["figure5_gap_distance.png"]
    # A study's top trials differ in more than T': never one curve.
    top = _comparison_rows(rounds=(1, 2)).assign(**{"param.mask_ratio": np.linspace(0.5, 0.9, 8)})
    assert rounds_curves(top) == {}


def test_report_on_a_comparison_draws_the_papers_figures(tmp_path):
    from raysd.report import write_report

    study = make_study(tmp_path)
    rows = _comparison_rows()
    Store(str(study)).write_rows(rows.to_dict("records"), "results", "trials.parquet")
    Store(str(study)).write_text(yaml.safe_dump({"compare": list(dict.fromkeys(rows["variant"]))}),
                                 "study.yaml")
    text = write_report(str(study))
    for name in ("figure4_rounds.png", "figure5_gap_distance.png"):
        path = study / "results" / "report" / name
        assert str(path) in text and path.stat().st_size > 1000


def test_a_fine_tuning_seed_repeats_fine_tuning_over_one_pre_training(digits, tmp_path):
    """finetune.seed changes the head, batches and dropout of fine-tuning only: pre-training keys
    stay equal (the artifact is built once and reused), fine-tuning's outputs differ, and unset
    it is the trial's seed."""
    from raysd.artifacts import ArtifactStore
    from raysd.recipe import Hooks, run_trial, seeded_for, stage_key
    from raysd.stages import StageRun

    store = ArtifactStore(str(tmp_path / "artifacts"), owner="t")
    outs, heads = {}, {}
    for ft_seed in (None, 2, 3):  # the trial's seed is 2
        def wrap(model, seen=heads.setdefault(ft_seed, [])):
            if isinstance(model, models.Classifier):
                seen.append(model.head.weight.detach().clone())
            return model

        torch.manual_seed(0)
        cfg = tiny_config({"finetune.seed": ft_seed, "evaluation.max_examples": 64,
                           "evaluation.signal": "none"}, method="further_pretrain", seed=2)
        outs[ft_seed] = run_trial(cfg, digits, models.build("vit_tiny"), Hooks(wrap=wrap, artifacts=store))
    assert outs[2]["key_further_pretrain"] == outs[3]["key_further_pretrain"]
    assert [outs[s]["reused_further_pretrain"] for s in (None, 2, 3)] == [False, True, True]
    assert not torch.equal(heads[2][0], heads[3][0])
    assert outs[2]["test_loss"] != outs[3]["test_loss"]
    assert outs[2]["init_distance"] != outs[3]["init_distance"]
    assert torch.equal(heads[None][0], heads[2][0])  # unset: the trial's seed
    assert outs[None]["test_loss"] == outs[2]["test_loss"]
    a, b = tiny_config({"finetune.seed": 0}), tiny_config({"finetune.seed": 1})
    for stage, round_ in (("further_pretrain", 0), ("self_distill", 1)):
        assert stage_key("p", a, stage, round_, Hooks(), digits) == stage_key("p", b, stage, round_, Hooks(), digits)
        assert StageRun(seeded_for(a, stage), Hooks(), stage, round_).seed(3, 0) == \
            StageRun(seeded_for(b, stage), Hooks(), stage, round_).seed(3, 0)
    # Batch order and per-step dropout draw from the fine-tuning run's seed.
    runs = [StageRun(seeded_for(c, "finetune"), Hooks(), "finetune", 0) for c in (a, b)]
    assert runs[0].seed() != runs[1].seed() and runs[0].seed(3, 0) != runs[1].seed(3, 0)
    assert stage_key("p", a, "further_pretrain", 0, Hooks(), digits) != stage_key(
        "p", tiny_config(seed=1), "further_pretrain", 0, Hooks(), digits)


@pytest.mark.parametrize("argv,message", [
    (["--protocol", "both"], "--protocol both: use full or reference"),
    (["--first-seed", "-1"], "--first-seed -1: must be >= 0"),
    (["--set", "finetune.seed=1"], "--set finetune.seed: compare sets the seeds"),
])
def test_bad_compare_flags_are_one_line_before_ray(argv, message, tmp_path, capsys):
    assert cli.main(["compare", "--space", "demo", *argv, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not any(tmp_path.iterdir())


# The suite's end-to-end compare runs every method in METHODS once, in two comparisons: the
# paper's Table 1 (and self_distill at two T') interrupted and resumed one trial at a time, and
# every other method side by side. Each method added to METHODS adds one trial to the second.
INTERRUPTED = ("finetune", "further_pretrain", "self_distill")
SIDE_BY_SIDE = tuple(m for m in METHODS if m not in INTERRUPTED)


def _check_seeds_reached_each_trial(after: pd.DataFrame) -> None:
    """The seeds compare chose (reference protocol, --first-seed 1): pre-training 1, fine-tuning 1."""
    assert (after["cfg.seed"] == after.seed).all() and (after.seed == 1).all()
    assert (after["cfg.finetune.seed"] == 1).all() and set(after.status) == {"completed"}
    assert after.trial_id.str.endswith("-s1-f1").all()


def test_a_comparison_is_interrupted_resumed_and_reported(ray_local, tmp_path, capsys):
    """finetune, further_pretrain and self_distill at two T', one seed, under the reference
    protocol, one trial at a time. Ctrl-C mid-comparison exits 130 naming `raysd compare
    --resume`; that finishes the trials left and writes the table, without re-running the
    finished ones, under the protocol it started with. Resuming it with `tune`, or with flags
    that choose other trials, is refused before Ray starts. `raysd report` then draws the
    paper's Figures 4 and 5 from its rows. Both drivers use the session's Ray (the interrupted
    one attaches with --address, the resumed one runs in this process): no Ray start of their own."""
    ray_tmp = tempfile.mkdtemp(prefix="rsd", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    study = tmp_path / "cmp"
    trials_file, table = study / "results" / "trials.parquet", study / "results" / "compare.txt"
    command = [sys.executable, "-m", "raysd.cli", "compare", "--space", "demo", *TINY,
               "--methods", ",".join(INTERRUPTED), "--rounds", "1,2", "--seeds", "1", "--first-seed", "1",
               "--protocol", "reference", "--max-concurrent", "1", "--storage", str(tmp_path), "--name", "cmp",
               "--address", ray_local.get_runtime_context().gcs_address]
    try:
        driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        deadline = time.time() + 400
        while not trials_file.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)  # the first trial is recorded; the second one is running
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = driver.communicate(timeout=300)
        wait_for_other_drivers(ray_local)
        assert driver.returncode == 130, out[-2000:] + err[-2000:]
        assert f"raysd compare --resume {study}" in err and not table.exists()
        done_before = pq.read_table(trials_file).to_pandas()
        assert len(done_before) == 1

        assert cli.main(["tune", "--resume", str(study)]) == 2
        assert cli.main(["compare", "--resume", str(study), "--seeds", "3", "--protocol", "full"]) == 2
        errors = capsys.readouterr().err
        assert f"a raysd compare study; finish it with raysd compare --resume {study}" in errors
        assert "drop --seeds, --protocol" in errors
        marker = tmp_path / "unpickled"
        assert "tuner.pkl" in plant_pickles(study, marker)  # what Tuner.restore unpickled
    finally:
        kill_processes_mentioning(ray_tmp)
    assert cli.main(["compare", "--resume", str(study)]) == 0
    resumed = capsys.readouterr().out
    after = pq.read_table(trials_file).to_pandas()
    variants = ["finetune", "further_pretrain", "self_distill T'=1", "self_distill T'=2"]
    assert sorted(after.variant) == sorted(variants) and set(after.method) == set(INTERRUPTED)
    _check_seeds_reached_each_trial(after)
    # Stage artifacts are shared: further_pretrain and self_distill at both T' run one further
    # pre-training, and T'=2 reuses round 1 of T'=1 (whichever ran first built them).
    pretrained = after[after.method.isin(["further_pretrain", "self_distill"])]
    assert pretrained["key_further_pretrain"].nunique() == 1
    assert pretrained["reused_further_pretrain"].sum() >= 2
    rounds = after[after.method == "self_distill"]
    assert rounds["key_self_distill_1"].nunique() == 1 and rounds["reused_self_distill_1"].sum() == 1
    first = after[after.trial_id == done_before.trial_id[0]].iloc[0]  # recorded once, not re-run
    assert first.wall_seconds == done_before.wall_seconds[0]
    assert not marker.exists()  # --resume unpickled nothing from the study folder
    text = table.read_text()
    assert text in resumed and "protocol reference" in text  # kept through --resume
    assert "started: variant=self_distill T'=2, seed=1, finetune.seed=1" in resumed
    assert "test_accuracy - finetune" in text and "test_accuracy - further_pretrain" in text
    assert all(f"\n{variant} " in text or f" {variant} " in text for variant in variants)
    assert "(baseline)" in text and "(n=1)" in text
    assert (study / "results" / "compare.png").stat().st_size > 1000
    assert cli.main(["report", str(study)]) == 0
    report = capsys.readouterr().out
    for name in ("figure4_rounds.png", "figure5_gap_distance.png"):
        assert name in report and (study / "results" / "report" / name).stat().st_size > 1000


def test_every_other_method_runs_end_to_end_side_by_side(ray_local, tmp_path, capsys):
    """Every method the interrupted comparison leaves out, one seed, reference protocol, two
    trials at a time on the session's Ray: each completes under the seeds compare chose, the
    self-distillation ablations share one further pre-training, and the table lists them all."""
    assert cli.main(["compare", "--space", "demo", *TINY, "--methods", ",".join(SIDE_BY_SIDE),
                     "--seeds", "1", "--first-seed", "1", "--protocol", "reference",
                     "--max-concurrent", "2", "--storage", str(tmp_path), "--name", "cmp"]) == 0
    out = capsys.readouterr().out
    study = tmp_path / "cmp"
    after = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    assert sorted(after.variant) == sorted(SIDE_BY_SIDE) and set(after.method) == set(SIDE_BY_SIDE)
    _check_seeds_reached_each_trial(after)
    # no_mae and the match_* targets distil from one further pre-training's theta_0;
    # further_pretrain_2x's longer stage is another
    distilled = after[after.method.isin(["no_mae", "match_predictions", "match_weights_l2",
                                         "match_weights_mars"])]
    assert len(distilled) == 4 and distilled["key_further_pretrain"].nunique() == 1
    assert after.loc[after.method == "further_pretrain_2x", "key_further_pretrain"].iloc[0] not in set(
        distilled["key_further_pretrain"])
    text = (study / "results" / "compare.txt").read_text()
    assert text in out and "protocol reference" in text
    assert all(f"\n{variant} " in text or f" {variant} " in text for variant in SIDE_BY_SIDE)
