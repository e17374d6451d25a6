"""Every search space validates without building a model; bad input is one line, exit 2."""
import subprocess
import sys

import pytest

from raysd import cli, models
from raysd.overrides import parse_overrides
from raysd.spaces import available, load_space

PAPER_PARAMS = ("mae_weight", "mask_ratio", "rounds")


@pytest.mark.parametrize("name", sorted(available()))
def test_every_space_validates_and_searches_lambda_gamma_rounds(name):
    space = load_space(name)
    cfg = space.trial_config()
    assert cfg.model in models.names()
    leaves = {p.key.rsplit(".", 1)[-1] for p in space.params}
    assert set(PAPER_PARAMS) <= leaves
    assert space.study.metric.startswith("val_")
    assert space.description


def test_required_spaces_exist():
    assert {"demo", "vit_small", "vit_base_mae", "roberta_base"} <= set(available())


def test_vit_base_mae_matches_the_papers_table_9():
    cfg = load_space("vit_base_mae").trial_config()
    assert cfg.weights == "hf:facebook/vit-mae-base"
    assert (cfg.further_pretrain.lr, cfg.further_pretrain.batch_size, cfg.further_pretrain.steps) == (1.5e-4, 64, 20000)
    assert (cfg.finetune.lr, cfg.finetune.batch_size, cfg.finetune.steps) == (1e-4, 32, 10000)
    assert (cfg.finetune.warmup_steps, cfg.finetune.grad_clip, cfg.finetune.weight_decay) == (500, 1.0, 0.01)
    assert cfg.mask_ratio == 0.75 and cfg.further_pretrain.beta2 == 0.95


def test_overrides_and_searched_values_reach_the_trial_config():
    space = load_space("demo", parse_overrides(["self_distill.rounds=2", "finetune.lr=3e-4"]))
    cfg = space.trial_config({"mask_ratio": 0.6})
    assert (cfg.self_distill.rounds, cfg.finetune.lr, cfg.mask_ratio) == (2, 3e-4, 0.6)


def test_conditional_parameter_only_when_it_applies():
    space = load_space("demo")
    mae_weight = next(p for p in space.params if p.key.endswith("mae_weight"))
    assert not mae_weight.active({"self_distill.rounds": 0})
    assert mae_weight.active({"self_distill.rounds": 2})


BAD_FILES = {
    "unknown top key": ("modle: vit_tiny\n", "unknown key 'modle'"),
    "unknown stage key": ("finetune: {stpes: 3}\n", "unknown key 'finetune.stpes'"),
    "mask ratio out of range": ("mask_ratio: 1.5\n", "mask_ratio: must be a number in (0, 1)"),
    "negative rounds": ("self_distill: {rounds: -1}\n", "self_distill.rounds: must be an integer >= 0"),
    "negative steps": ("further_pretrain: {steps: -3}\n", "further_pretrain.steps: must be an integer >= 1"),
    "unknown model": ("model: vit_gigantic\n", "model: must be one of"),
    "bad range": ("search:\n  mask_ratio: {type: float, low: 0.9, high: 0.5}\n", "search.mask_ratio: low must be below high"),
    "range leaves the valid set": ("search:\n  mask_ratio: {type: float, low: 0.5, high: 1.2}\n",
                                   "search.mask_ratio: value 1.2 in its range is invalid"),
    "unknown search key": ("search:\n  self_distill.lambda: {type: float, low: 0, high: 1}\n", "unknown key 'self_distill.lambda'"),
    "test metric": ("study: {metric: test_accuracy}\n", "study.metric: must be a validation metric"),
    "bad yaml": ("model: [vit\n", "not valid YAML"),
}


def _space_file(tmp_path, extra: str):
    """The demo space with one top-level section (and its indented lines) replaced by `extra`."""
    key = extra.split(":")[0] + ":"
    kept, skipping = [], False
    for line in available()["demo"].read_text().splitlines():
        if not line.startswith(" "):
            skipping = line.startswith(key)
        if not skipping:
            kept.append(line)
    path = tmp_path / "space.yaml"
    path.write_text("\n".join(kept) + "\n" + extra)
    return path


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_space_file_is_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    extra, message = BAD_FILES[case]
    path = _space_file(tmp_path, extra)
    storage = tmp_path / "out"
    code = cli.main(["tune", "--space", str(path), "--storage", str(storage)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not storage.exists()


@pytest.mark.parametrize("argv,message", [
    (["run", "--space", "nope"], "unknown space 'nope'"),
    (["run", "--space", "demo", "--set", "self_distill.lamda=1"], "--set self_distill.lamda: unknown key"),
    (["run", "--space", "demo", "--set", "novalue"], "expected KEY=VALUE"),
    (["run", "--space", "demo", "--data", "imagefolder:/no/such/dir"], "directory /no/such/dir does not exist"),
    (["run", "--space", "demo", "--data", "ftp:x"], "unknown source"),
    (["run", "--space", "demo", "--set", "mask_ratio=0"], "mask_ratio: must be a number in (0, 1)"),
    (["tune", "--resume", "/no/such/study"], "not a raysd study"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code = cli.main(argv + ["--storage", str(tmp_path / "out")] if argv[0] != "tune" else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_console_script_exit_code_and_spaces_listing():
    out = subprocess.run([sys.executable, "-m", "raysd.cli", "spaces"], capture_output=True, text=True)
    assert out.returncode == 0
    assert {line.split()[0] for line in out.stdout.splitlines()} == set(available())
    bad = subprocess.run([sys.executable, "-m", "raysd.cli", "run", "--space", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("raysd: error: unknown space")


def test_set_reaches_nested_keys_scheduler_and_search():
    space = load_space("vit_small", parse_overrides([
        "study.scheduler.grace_period=2", "search.mask_ratio.high=0.8", "search.finetune.lr=none"]))
    assert space.study.scheduler["grace_period"] == 2 and space.study.scheduler["type"] == "asha"
    gamma = next(p for p in space.params if p.key == "mask_ratio")
    assert gamma.high == 0.8 and "finetune.lr" not in {p.key for p in space.params}
    off = load_space("vit_small", parse_overrides(["study.scheduler=none"]))
    assert off.study.scheduler is None
    on = load_space("demo", parse_overrides(["study.scheduler.grace_period=2",
                                             "search.seed={type: int, low: 0, high: 2}"]))
    assert on.study.scheduler == {"type": "asha", "grace_period": 2}
    assert "seed" in {p.key for p in on.params}


def test_asha_rungs_are_stage_boundaries_and_no_t_prime_is_cut_short():
    from raysd.spaces import pretrain_stages
    from raysd.study import _scheduler

    space = load_space("vit_small", {"study.rounds": "param"})  # T' in 0..3: 1 to 4 pre-training stages
    assert pretrain_stages(space) == (1, 4)
    asha = _scheduler(space)
    assert asha._time_attr == "stages_done" and asha._metric == "knn_accuracy"
    assert asha._max_t == 5  # beyond the last stage of the longest trial: nobody hits it


def test_a_searched_t_prime_runs_as_chains_whose_rungs_are_points():
    from raysd.study import _scheduler

    space = load_space("vit_small")  # T' in 0..3: a chain fine-tunes at T' = 0, 1, 2, 3
    assert space.chain.points == (0, 1, 2, 3)
    assert "self_distill.rounds" not in {p.key for p in space.sampled}
    assert space.chain.config(space.trial_config()).self_distill.rounds == 3
    asha = _scheduler(space)
    # Rungs after each point's fine-tune, on the study's own validation metric.
    assert asha._time_attr == "points_done" and asha._metric == "val_accuracy"
    assert asha._max_t == 5  # past the last point: no chain is stopped for reaching it
    assert load_space("vit_small", {"study.rounds": "param"}).chain is None
    fixed = load_space("vit_small", {"search.self_distill.rounds": "none",
                                     "search.self_distill.mae_weight.when": None})
    assert fixed.chain is None  # T' fixed: param mode
    # a `when` that names T' is judged at the chain's T' for sampling, at each point's for rows
    demo = load_space("demo")
    assert demo.active({"self_distill.rounds": 0, "self_distill.mae_weight": 0.5}) == {"self_distill.rounds": 0}


@pytest.mark.parametrize("argv,message", [
    (["--set", "study.scheduler.max_t=100"], "--set study.scheduler.max_t: unknown key"),
    (["--set", "evaluation.signal=none", "--set", "study.scheduler.grace_period=1",
      "--set", "study.rounds=param"], "ASHA acts on the early signal"),
    (["--set", "study.rounds=chain", "--set", "search.self_distill.rounds=none",
      "--set", "search.self_distill.mae_weight=none"],
     "study.rounds: chain needs a searched self_distill.rounds"),
    (["--set", "study.rounds=both"], "study.rounds: must be chain | param"),
    (["--set", "study.scheduler.grace_period=99999"], "study.scheduler.grace_period: must be at most"),
    (["--set", "study.scheduler.patience=3"], "--set study.scheduler.patience: unknown key"),
    (["--set", "search.mask_ratio.hihg=0.8"], "'hihg' is not a field of search.mask_ratio"),
    (["--set", "search.finetune.lr.high=1e-3"], "'finetune.lr' is not searched"),
    (["--set", "search.finetune.lr=none"], "'finetune.lr' is not searched"),
    (["--set", "finetune.warmup_steps=500"], "finetune.warmup_steps: must be at most finetune.steps"),
    (["--set", "evaluation.every=1000"], "evaluation.every: must be at most finetune.steps"),
    (["--set", "precision=fp16"], "precision: must be fp32 | tf32 | bf16"),
    (["--set", "finetune.augment=mixup"], "finetune.augment: must be flip | rrc | none"),
    (["--set", "finetune.dropout=1.5"], "finetune.dropout: must be a number in [0, 1)"),
    (["--set", "evaluation.val_fraction=1"], "evaluation.val_fraction: must be a number in [0, 1)"),
    # RecAdam's own coef (5000) at the demo's lr (1e-3): its pull diverges (lr x coef >= 2)
    (["--set", "method=recadam", "--set", "recadam.pretrain_coef=5000"],
     "recadam.pretrain_coef: must be below 2 / finetune.lr = 2000"),
])
def test_dependent_settings_and_nested_set_errors(tmp_path, capsys, argv, message):
    code = cli.main(["tune", "--space", "demo", *argv, "--storage", str(tmp_path / "out"),
                     "--address", "127.0.0.1:1"])  # an input that slipped through cannot run
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
