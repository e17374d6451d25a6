"""`--smoke` runs every shipped space on this machine - its own model, weights (saved here)
and search, on small generated data - through every stage, and marks the results as a smoke run."""
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysd import cli, models
from raysd.models.weights import save_backbone
from raysd.spaces import available, load_space


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A 2-class image folder and a 2-label jsonl task, a few examples each."""
    root = tmp_path_factory.mktemp("smoke_data")
    for split, count in (("train", 8), ("test", 3)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (24, 24), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    text = root / "text"
    text.mkdir()
    for name, count in (("train", 8), ("dev", 3), ("test", 3)):
        lines = [{"text": f"the {word} example number {i}", "label": word}
                 for i in range(count) for word in ("cat", "dog")]
        (text / f"{name}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def _local_weights(model: str, folder):
    """The space's model saved by raysd (a random init): local weights, no hub."""
    backbone = models.build(model)
    if models.family(model) == "roberta":
        from raysd.data.text import builtin_tokenizer

        backbone.tokenizer = builtin_tokenizer()
    return save_backbone(backbone, folder / model, model)


def _check_smoke_study(code: int, out: str, err: str, study, command: str, cfg) -> None:
    assert code == 0, out[-3000:] + err[-2000:]
    assert "--smoke shrinks what costs time" in out and "finetune.steps:" in out
    trials = pq.read_table(study / "results" / "trials.parquet").to_pandas()
    history = pq.read_table(study / "results" / "history").to_pandas()
    assert trials.trial_id.nunique() == (2 if command == "tune" else 1)
    if "best_point" in trials:  # a chain study (the demo's tune): smoke chains at T' = 0 and 1
        assert len(trials) == 2 * trials.trial_id.nunique()
        assert set(trials["param.self_distill.rounds"]) == {0, 1}
    else:
        assert len(trials) == trials.trial_id.nunique()
    assert set(trials.status) == {"completed"} and trials.smoke.all()
    if cfg.method == "self_distill":  # every stage ran, self-distillation included
        assert {"further_pretrain", "self_distill", "finetune"} <= set(history.stage)


def test_smoke_runs_the_demo_space(demo_smoke_job):
    """The demo's whole 2-trial smoke study (its data ships with the install; no weights spares
    building the demo's), as `ray job submit` ran it in conftest.demo_smoke_job."""
    job, study, _ = demo_smoke_job
    _check_smoke_study(job.returncode, job.stdout, job.stderr, study, "tune",
                       load_space("demo").trial_config())


@pytest.mark.parametrize("name", sorted(set(available()) - {"demo"}))
def test_smoke_runs_every_shipped_space(generated, ray_local, tmp_path, capsys, name):
    cfg = load_space(name).trial_config()
    data = "jsonl:" + str(generated / "text") if models.family(cfg.model) == "roberta" \
        else "imagefolder:" + str(generated / "images")
    # One trial each (`run`) to keep the suite within CI's time on a 2-core machine; in this
    # process, on the session's Ray: a Ray start per space would cost CI minutes.
    code = cli.main(["run", "--space", name, "--smoke", "--storage", str(tmp_path), "--name", "smoke",
                     "--data", data, "--set", f"weights={_local_weights(cfg.model, tmp_path)}"])
    out = capsys.readouterr()
    _check_smoke_study(code, out.out, out.err, tmp_path / "smoke", "run", cfg)
