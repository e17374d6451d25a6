"""Bad input found before Ray starts: one line naming what is wrong, exit 2, no traceback,
nothing written. Every case points at an unreachable Ray address, so an input that slipped
through would fail to connect (exit 1) instead of passing quietly."""
import json

import pytest
from PIL import Image

from raysd import cli, models
from raysd.errors import ConfigError
from raysd.models.weights import save_backbone

NOWHERE = ["--address", "127.0.0.1:1"]


def _images(root, split, classes, per_class=2):
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")


def _jsonl(root, lines: dict[str, list]):
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train", "dev", "test"):
        rows = lines.get(name, [{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "y"}])
        (root / f"{name}.jsonl").write_bytes(
            b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Data folders, weights folders and a space file, each wrong in one way."""
    root = tmp_path_factory.mktemp("inputs")
    _images(root / "one_class", "train", ["a"])
    _images(root / "one_class", "test", ["a"])
    _images(root / "val_lacks_class", "train", ["a", "b"])
    _images(root / "val_lacks_class", "val", ["a"])
    _images(root / "val_lacks_class", "test", ["a", "b"])
    _images(root / "tiny", "train", ["a", "b"], per_class=3)
    _images(root / "tiny", "test", ["a", "b"])
    _jsonl(root / "no_label", {"train": [{"text": "a"}, {"text": "b", "label": "y"}]})
    _jsonl(root / "not_utf8", {"dev": [{"text": "a", "label": "x"}, b'{"text": "\xff\xfe", "label": "x"}']})
    _jsonl(root / "bad_json", {"test": [b"{not json"]})
    _jsonl(root / "unseen_label", {"dev": [{"text": "a", "label": "z"}]})
    _jsonl(root / "one_label", {n: [{"text": "a", "label": "x"}] * 2 for n in ("train", "dev", "test")})
    save_backbone(models.build("vit_tiny"), root / "vit_tiny_weights", "vit_tiny")
    shapes = root / "renamed_model"
    save_backbone(models.build("vit_tiny"), shapes, "vit_tiny")
    meta = json.loads((shapes / "raysd.json").read_text())
    (shapes / "raysd.json").write_text(json.dumps({**meta, "model": "vit_small"}))
    (root / "empty_dir").mkdir()
    (root / "hf_bert").mkdir()
    (root / "hf_bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "a_file").write_text("not a folder")
    (root / "mixed.yaml").write_text(
        (cli_space_text() + "search:\n  finetune.lr: {type: choice, choices: [none, 0.001]}\n"))
    (root / "step_log.yaml").write_text(
        (cli_space_text() + "search:\n  mask_ratio: {type: float, low: 0.5, high: 0.9, step: 0.1, log: true}\n"))
    (root / "workers_range.yaml").write_text(
        (cli_space_text() + "search:\n  resources.workers: {type: int, low: 1, high: 3}\n"))
    (root / "gpu_string.yaml").write_text(cli_space_text().replace("use_gpu: false", 'use_gpu: "false"'))
    (root / "bad_scheduler.yaml").write_text(
        cli_space_text().replace("study:\n", "study:\n  scheduler: {type: asha, grace_period: 0}\n"))
    return root


def cli_space_text() -> str:
    """The demo space without its search section (cases append their own)."""
    from raysd.spaces import available

    text = available()["demo"].read_text()
    return text[: text.index("search:")]


D = "{root}"  # replaced by the fixture's folder
CASES = {
    # from issue 7's measurements
    "weights dir missing": (["--set", "weights=/no/such/dir"], "weights '/no/such/dir': not a directory"),
    "image folder with one class": (["--data", f"imagefolder:{D}/one_class"], "train has 1 class"),
    "jsonl line without label": (["--data", f"jsonl:{D}/no_label", "--set", "model=roberta_tiny",
                                  "--set", "weights=none"], "train.jsonl line 1: needs an object"),
    "storage under a file": (["--storage", f"{D}/a_file/studies"], "a_file is a file, not a folder"),
    "name dot dot": (["--name", ".."], "--name '..'"),
    "val lacks a class": (["--data", f"imagefolder:{D}/val_lacks_class"], "must have the same class folders"),
    "choices mix none and numbers": (["--space", f"{D}/mixed.yaml"], "choices must all be numbers"),
    "set value not yaml": (["--set", "finetune.lr=["], "VALUE is not valid YAML"),
    "step with log": (["--space", f"{D}/step_log.yaml"], "search.mask_ratio"),
    "use_gpu as a string": (["--space", f"{D}/gpu_string.yaml"], "resources.use_gpu: must be true or false"),
    # issue 7, item 6
    "weights for another model": (["--set", f"weights={D}/renamed_model"], "saved for model 'vit_small'"),
    "weights of a wrong format": (["--set", f"weights={D}/empty_dir"], "no raysd.json or config.json"),
    "hf checkpoint of another family": (["--set", f"weights={D}/hf_bert"], "a 'bert' checkpoint"),
    "unknown timm model": (["--set", "weights=timm:vit_nonexistent_patch3"], "timm has no model"),
    "demo weights for roberta_base": (["--set", "model=roberta_base", "--data", "builtin:text"],
                                      "builtin:demo' exist for ViT models and roberta_tiny only"),
    # issue 12: found only inside the worker, after Ray had started
    "max_length beyond the model's positions": (
        ["--set", "model=roberta_tiny", "--set", "weights=none", "--data", "builtin:text",
         "--set", "max_length=256"],
        "max_length: must be at most 128, the positions of roberta_tiny (got 256)"),
    "hub id malformed": (["--set", "weights=hf:not a hub id"], "expected hf:OWNER/NAME"),
    "hub revision empty": (["--set", "weights=hf:facebook/vit-mae-base@"], "malformed revision"),
    "jsonl not utf8": (["--data", f"jsonl:{D}/not_utf8", "--set", "model=roberta_tiny",
                        "--set", "weights=none"], "dev.jsonl line 2: not UTF-8"),
    "jsonl not json": (["--data", f"jsonl:{D}/bad_json", "--set", "model=roberta_tiny",
                        "--set", "weights=none"], "test.jsonl line 1: not valid JSON"),
    "jsonl label unseen in train": (["--data", f"jsonl:{D}/unseen_label", "--set", "model=roberta_tiny",
                                     "--set", "weights=none"], "label 'z' does not occur in train.jsonl"),
    "jsonl with one label": (["--data", f"jsonl:{D}/one_label", "--set", "model=roberta_tiny",
                              "--set", "weights=none"], "train has 1 class"),
    "fewer examples than the batch": (["--data", f"imagefolder:{D}/tiny"], "fewer than the global batch of 64"),
    "workers range breaks the batch": (["--space", f"{D}/workers_range.yaml"],
                                       "search.resources.workers: value 3 in its range is invalid"),
    "boolean given as number": (["--set", "logging.keep_checkpoints=1"],
                                "logging.keep_checkpoints: must be true or false"),
    "float where an int belongs": (["--set", "further_pretrain.steps=2.5"],
                                   "further_pretrain.steps: must be an integer >= 1"),
    "name with a slash": (["--name", "a/b"], "--name 'a/b'"),
    "name dot": (["--name", "."], "--name '.'"),
    "placement unknown": (["--set", "resources.placement=diagonal"], "resources.placement: must be pack"),
    "custom resource reserved": (["--set", "resources.custom={GPU: 1}"], "resources.custom"),
    "accelerator without gpu": (["--set", "resources.accelerator_type=A100"], "set only with resources.use_gpu"),
    "scheduler grace period zero": (["--space", f"{D}/bad_scheduler.yaml"], "study.scheduler.grace_period"),
    "max failures below -1": (["--set", "study.max_failures=-2"], "study.max_failures: must be an integer >= -1"),
    "storage scheme unknown": (["--storage", "nosuchscheme://bucket/x"], "--storage nosuchscheme://bucket/x"),
}
RESUME_CASES = {
    "resume with a space": (["tune", "--resume", "{study}", "--space", "demo"], "drop --space"),
    "resume with a name and sets": (["tune", "--resume", "{study}", "--name", "x", "--set", "seed=1"],
                                    "drop --set, --name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, tmp_path, capsys, case):
    flags, message = CASES[case]
    flags = [f.replace(D, str(inputs)) for f in flags]
    storage = tmp_path / "out"
    space = [] if "--space" in flags else ["--space", "demo"]
    before = sorted(p.name for p in inputs.rglob("*"))
    code = cli.main(["tune", *space, "--storage", str(storage), *NOWHERE, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace(D, str(inputs)) in err, err
    assert err.startswith("raysd: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not storage.exists()
    assert sorted(p.name for p in inputs.rglob("*")) == before  # nothing written beside the input


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_flags_that_conflict_with_resume(tmp_path, capsys, case):
    argv, message = RESUME_CASES[case]
    study = tmp_path / "study"
    code = cli.main([a.replace("{study}", str(study)) for a in argv] + NOWHERE)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not study.exists()


# Issue 19, item 9: each of these gave a traceback (or, for --top 0, ran the space's defaults).
# `{root}` is the inputs fixture, `{study}` a study folder with one completed trial.
COMMAND_CASES = {
    "when value 1e": (["tune", "--space", "{root}/when_1e.yaml"], "when must read 'KEY OP NUMBER'"),
    "loggers a nested list": (["tune", "--space", "demo", "--set", "study.loggers=[[mlflow]]"],
                              "study.loggers: must be a list of mlflow, wandb"),
    "compare rounds not integers": (["compare", "--space", "demo", "--rounds", "1,x"],
                                    "--rounds '1,x': expected comma-separated integers >= 0"),
    "space file not utf8": (["tune", "--space", "{root}/latin1.yaml"], "latin1.yaml: not UTF-8"),
    "report unknown scheme": (["report", "nosuch://b/s"], "nosuch://b/s: unknown storage scheme 'nosuch'"),
    "ls unknown scheme": (["ls", "nosuch://b"], "nosuch://b: unknown storage scheme 'nosuch'"),
    "export unknown scheme": (["export", "nosuch://b/s", "out"], "nosuch://b/s: unknown storage scheme"),
    "resume unknown scheme": (["tune", "--resume", "nosuch://b/s"], "nosuch://b/s: unknown storage scheme"),
    "compare from unknown scheme": (["compare", "--from", "nosuch://b/s"],
                                    "nosuch://b/s: unknown storage scheme"),
    "export to an unknown scheme": (["export", "{study}", "nosuch://b/m"], "nosuch://b/m: unknown storage scheme"),
    "reduction factor one": (["tune", "--space", "demo", "--set", "study.scheduler.reduction_factor=1"],
                             "study.scheduler.reduction_factor: must be an integer >= 2 (got 1)"),
    "compare top zero": (["compare", "--from", "{study}", "--top", "0"], "--top 0: must be at least 1"),
    "ls on a file": (["ls", "{root}/a_file"], "a_file is a file, not a folder of studies"),
    "artifacts under a file": (["tune", "--space", "demo", "--artifacts", "{root}/a_file/shared"],
                               "--artifacts {root}/a_file/shared: {root}/a_file is a file, not a folder"),
    # google-cloud-storage is not installed here: leases on gs:// could not be taken.
    "artifacts on gs without its client": (["tune", "--space", "demo", "--artifacts", "gs://b/shared"],
                                           "artifacts gs://b/shared: one builder per artifact on gs:// "
                                           "needs google-cloud-storage"),
    "text model given images": (["run", "--space", "demo_text", "--data", "builtin:digits"],
                                "model roberta_tiny reads text; data 'builtin:digits' is images"),
    "image model given text": (["run", "--space", "demo", "--data", "builtin:text"],
                               "model vit_tiny reads images; data 'builtin:text' is text"),
}


@pytest.fixture(scope="module")
def study(inputs):
    """A study folder as run_study leaves it: the demo space and one completed trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysd.spaces import available

    folder = inputs / "study"
    (folder / "results").mkdir(parents=True)
    (folder / "space.yaml").write_text(available()["demo"].read_text())
    (folder / "study.yaml").write_text("space: demo\nstate_format: 2\n")
    row = {"trial_id": "t1", "status": "completed", "val_accuracy": 0.9, "param.mask_ratio": 0.6,
           "param.self_distill.rounds": 1.0, "param.self_distill.mae_weight": 0.5}
    pq.write_table(pa.Table.from_pylist([row]), folder / "results" / "trials.parquet")
    (inputs / "when_1e.yaml").write_text(
        available()["demo"].read_text().replace("self_distill.rounds > 0", "self_distill.rounds > 1e"))
    (inputs / "latin1.yaml").write_bytes("description: café\n".encode("latin-1") + cli_space_text().encode())
    return folder


@pytest.fixture
def no_ray(monkeypatch):
    """Input that slips through reaches Ray: fail at once there instead of waiting to connect."""
    from raysd import cluster

    def reached(*_):
        raise RuntimeError("reached Ray")

    monkeypatch.setattr(cluster, "ensure_ray", reached)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
def test_bad_command_is_one_line_exit_2_nothing_written(inputs, study, no_ray, tmp_path, monkeypatch,
                                                         capsys, case):
    argv, message = COMMAND_CASES[case]
    monkeypatch.chdir(tmp_path)  # the default storage, ./raysd_results, must not appear
    argv = [a.replace("{root}", str(inputs)).replace("{study}", str(study)) for a in argv]
    if argv[0] in ("tune", "run", "compare"):
        argv += NOWHERE
    before = _files(inputs)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("{root}", str(inputs)) in err, err
    assert err.startswith("raysd: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _files(tmp_path) == [] and _files(inputs) == before


def test_compare_from_a_study_with_smoke_shrinks_that_studys_space(study, tmp_path, monkeypatch, capsys):
    """It raised a TypeError (the smoke space was reloaded from --space, which --from leaves unset)."""
    from raysd import cluster

    monkeypatch.chdir(tmp_path)

    def stop(*_):
        raise ConfigError("stopped where Ray would start")

    monkeypatch.setattr(cluster, "ensure_ray", stop)
    code = cli.main(["compare", "--from", str(study), "--smoke", "--seeds", "1", *NOWHERE])
    out, err = capsys.readouterr()
    assert code == 2 and err == "raysd: error: stopped where Ray would start\n", err
    assert "--smoke shrinks" in out and "finetune.steps: 150 -> 4" in out


UNREADABLE = """
import json, sys
from raysd import cli
root, out = sys.argv[1], []
for argv in ([["tune", "--space", f"{root}/space.yaml"], ["tune", "--space", "demo", "--data",
             f"imagefolder:{root}/images"], ["report", f"{root}/study"], ["tune", "--resume", f"{root}/study"],
             ["ls", f"{root}/study"], ["tune", "--space", "demo", "--storage", f"{root}/study/new"]]):
    argv += ["--address", "127.0.0.1:1"] if argv[0] == "tune" else []
    out.append([cli.main(argv), argv])
print(json.dumps(out))
"""


def test_an_unreadable_path_is_one_line_exit_2(study, tmp_path):
    """chmod 000 on a space file, a data folder and a study folder. Root reads anything, so as
    root the commands run without the capabilities that let it (setpriv)."""
    import os
    import shutil
    import subprocess
    import sys

    from raysd.spaces import available

    root = tmp_path / "locked"
    root.mkdir()
    (root / "space.yaml").write_text(available()["demo"].read_text())
    shutil.copytree(study, root / "study")
    _images(root / "images", "train", ["a", "b"])
    for path in (root / "space.yaml", root / "images", root / "study"):
        path.chmod(0)
    drop = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
    try:
        done = subprocess.run([*drop, sys.executable, "-c", UNREADABLE, str(root)], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    finally:
        for path in (root / "space.yaml", root / "images", root / "study"):
            path.chmod(0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert [code for code, _ in json.loads(done.stdout.strip().splitlines()[-1])] == [2] * 6, done.stderr
    assert len(lines) == 6 and all(line.startswith("raysd: error: ") and "ermission denied" in line
                                   for line in lines), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]
    assert not (root / "study" / "new").exists()


def test_a_second_driver_on_a_study_is_refused_in_one_line(study, no_ray, tmp_path, monkeypatch, capsys):
    """Issue 19 item 8: a resume, or a new study of the same name, while a driver holds it."""
    import os

    from raysd.driver_lock import DriverLock

    monkeypatch.chdir(tmp_path)
    storage, before = tmp_path / "storage", _files(study)
    with DriverLock(str(study)), DriverLock(str(storage / "taken")):
        resumed = cli.main(["tune", "--resume", str(study), *NOWHERE])
        resumed_err = capsys.readouterr().err
        started = cli.main(["run", "--space", "demo", "--storage", str(storage), "--name", "taken", *NOWHERE])
        started_err = capsys.readouterr().err
    assert (resumed, started) == (2, 2), resumed_err + started_err
    for err, uri in ((resumed_err, study), (started_err, storage / "taken")):
        assert err == (f"raysd: error: study {uri} is being run by another driver (host "
                       f"{os.uname().nodename}, pid {os.getpid()}): one study, one driver\n")
    assert _files(study) == before and not (storage / "taken").exists()
