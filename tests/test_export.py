"""Fine-tuned models: what a trial saves, and `raysd export` to transformers and timm, checked on
models whose every tensor is random (biases, norms and position embeddings included)."""
from __future__ import annotations

import copy
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms
from transformers import (AutoImageProcessor, AutoTokenizer, RobertaConfig,
                          RobertaForSequenceClassification, ViTForImageClassification, ViTImageProcessor)

from conftest import tiny_config
from raysd import hub_formats, models
from raysd.data.images import MEAN, STD
from raysd.errors import ConfigError
from raysd.export import MODEL_META, WEIGHTS_FILE, describe, export_model, load_classifier, model_saver
from raysd.models import Classifier
from raysd.recipe import Hooks, run_trial
from raysd.storage import Store

IMAGE_LABELS = ("cat", "dog", "bird")
TEXT_LABELS = ("asyncio", "email", "http", "logging")
TEXTS = ["Run the event loop until a Future is done.", "Return a logger with the given name.",
         "Parse an XML document.", "Send the message."]
CARD = {"study": "demo", "trial_id": "t0001", "method": "self_distill",
        "params": {"mask_ratio": 0.6, "mae_weight": 0.5, "rounds": 2},
        "metrics": {"val_accuracy": 0.75, "test_accuracy": 0.5}}


def _randomised_classifier(name: str, labels: tuple[str, ...], seed: int = 0):
    """A Classifier of `name` whose every parameter is random, and its describe() metadata."""
    torch.manual_seed(seed)
    backbone = models.build(name)
    meta = describe(tiny_config(model=name), types.SimpleNamespace(num_classes=len(labels), labels=labels),
                    backbone)
    classifier = Classifier(backbone, len(labels))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in classifier.parameters():  # the frozen sin-cos position embeddings too
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    assert all(p.unique().numel() > 1 for p in classifier.parameters())
    return classifier.eval(), meta


def _saved(tmp_path_factory, name: str, labels: tuple[str, ...]):
    classifier, meta = _randomised_classifier(name, labels)
    folder = str(tmp_path_factory.mktemp(name) / "model")
    model_saver(folder, meta)(classifier, {"val_accuracy": 0.75})  # what a trial's rank 0 calls
    return classifier, folder


@pytest.fixture(scope="module")
def vit_saved(tmp_path_factory):
    return _saved(tmp_path_factory, "vit_tiny", IMAGE_LABELS)


@pytest.fixture(scope="module")
def roberta_saved(tmp_path_factory):
    return _saved(tmp_path_factory, "roberta_tiny", TEXT_LABELS)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=atol)


def _vit_mismatches(ours: Classifier, out) -> dict[str, float]:
    """Each output on which the export differs from raysd beyond float tolerance, with the
    largest difference; {} when all agree. Shared by the equivalence and mutation tests."""
    hf = ViTForImageClassification.from_pretrained(out).eval()
    tm = timm.create_model(f"local-dir:{out}/timm", pretrained=True).eval()
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    # An image that is not square, so the resize and the crop both act, as raysd's image folders
    # see it: decoded with Resize + CenterCrop, then scaled to [0, 1] and normalised.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    crop = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    raysd_pixels = ((crop(photo) - MEAN) / STD)[None]
    tm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=tm))
    with torch.no_grad():
        logits = ours({"x": images})
        pairs = {
            "transformers logits": (hf(pixel_values=images).logits, logits),
            "timm logits": (tm(images), logits),
            "image processor": (AutoImageProcessor.from_pretrained(out)(photo, return_tensors="pt")
                                ["pixel_values"], raysd_pixels),
            "timm transform": (tm_transform(photo)[None], raysd_pixels),
        }
    # Two resizers may round a pixel one 8-bit level apart: 1/255/std = 0.018 once normalised.
    tolerance = {"image processor": 0.02, "timm transform": 0.02}
    return {name: (a - b).abs().max().item() for name, (a, b) in pairs.items()
            if not _close(a, b, atol=tolerance.get(name, 1e-5))}


def test_vit_export_loads_in_transformers_and_timm_with_raysd_logits(vit_saved, tmp_path):
    ours, folder = vit_saved
    out = export_model(folder, str(tmp_path / "out"), CARD)
    assert _vit_mismatches(ours, out) == {}
    config = ViTForImageClassification.from_pretrained(out).config
    assert config.id2label == dict(enumerate(IMAGE_LABELS))
    assert config.label2id == {name: i for i, name in enumerate(IMAGE_LABELS)}
    assert json.loads((out / "timm" / "config.json").read_text())["label_names"] == list(IMAGE_LABELS)
    card = (out / "README.md").read_text()
    assert all(s in card for s in ("t0001", "demo", "| mask_ratio | 0.6 |", "| val_accuracy | 0.75 |",
                                   "cat, dog, bird", "timm.create_model"))


# Bugs the comparison above must catch, each injected into hub_formats.py.
def _qk_swapped(monkeypatch):
    """The q and k chunks of timm's fused qkv go to transformers' key and query."""
    q, k = hub_formats.VIT_LAYER_KEYS["q"], hub_formats.VIT_LAYER_KEYS["k"]
    monkeypatch.setitem(hub_formats.VIT_LAYER_KEYS, "q", k)
    monkeypatch.setitem(hub_formats.VIT_LAYER_KEYS, "k", q)


def _norms_swapped(monkeypatch):
    """norm1 goes to layernorm_after and norm2 to layernorm_before."""
    norm1, norm2 = hub_formats.VIT_LAYER_KEYS["norm1"], hub_formats.VIT_LAYER_KEYS["norm2"]
    monkeypatch.setitem(hub_formats.VIT_LAYER_KEYS, "norm1", norm2)
    monkeypatch.setitem(hub_formats.VIT_LAYER_KEYS, "norm2", norm1)


def _timm_mean_pooling(monkeypatch):
    """timm's head reads the mean of the tokens, not the CLS token."""
    build = hub_formats.timm_config

    def config(meta):
        out = build(meta)
        out["model_args"].update(global_pool="avg", fc_norm=False)  # the final norm kept: it loads
        return out

    monkeypatch.setattr(hub_formats, "timm_config", config)


def _squashing_processor(monkeypatch):
    """ViTImageProcessor's default: the whole image squashed to 32x32, no centre crop."""
    def processor(meta):
        return ViTImageProcessor(size={"height": 32, "width": 32}, resample=2,
                                 image_mean=meta["mean"], image_std=meta["std"])

    monkeypatch.setattr(hub_formats, "image_processor", processor)


@pytest.mark.parametrize("inject,caught_by", [
    (_qk_swapped, {"transformers logits"}),
    (_norms_swapped, {"transformers logits"}),
    (_timm_mean_pooling, {"timm logits"}),
    (_squashing_processor, {"image processor"}),
], ids=["q-k-swapped", "norm1-norm2-swapped", "timm-mean-pooling", "squashing-processor"])
def test_vit_export_check_catches_injected_bugs(vit_saved, tmp_path, monkeypatch, inject, caught_by):
    ours, folder = vit_saved
    inject(monkeypatch)
    mismatches = _vit_mismatches(ours, export_model(folder, str(tmp_path / "out"), CARD))
    assert set(mismatches) == caught_by, mismatches
    assert min(mismatches.values()) > 1e-3, mismatches  # far beyond float noise


def _roberta_mismatches(ours: Classifier, out) -> dict[str, float]:
    """As _vit_mismatches, for RoBERTa: the exported tokenizer's ids and the logits."""
    hf = RobertaForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    theirs = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    mine = ours.backbone.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=24,
                                   return_tensors="pt")
    assert (mine["attention_mask"] == 0).any()  # padding is part of what must agree
    with torch.no_grad():
        pairs = {
            "token ids": (theirs["input_ids"], mine["input_ids"]),
            "transformers logits": (hf(**theirs).logits, ours(dict(mine))),
        }
    return {name: (a - b).abs().max().item() for name, (a, b) in pairs.items() if not _close(a, b)}


def test_roberta_export_loads_in_transformers_with_raysd_logits(roberta_saved, tmp_path):
    ours, folder = roberta_saved
    out = export_model(folder, str(tmp_path / "out"), CARD)
    assert _roberta_mismatches(ours, out) == {}
    assert RobertaConfig.from_pretrained(out).id2label == dict(enumerate(TEXT_LABELS))
    assert "dense = s*I" in (out / "README.md").read_text()  # the head's approximation, said


def _head_scale_too_large(monkeypatch):
    """dense = s*I with s*x up to 0.5: tanh bends, the logits drift."""
    monkeypatch.setattr(hub_formats, "ROBERTA_HEAD_MARGIN", 0.5)


def _head_not_rescaled(monkeypatch):
    """out_proj = W/s left out: dense = s*I, out_proj = W."""
    convert = hub_formats.roberta_to_hf

    def buggy(classifier, meta):
        hf, scale = convert(classifier, meta)
        with torch.no_grad():
            hf.classifier.out_proj.weight.mul_(scale)
        return hf, scale

    monkeypatch.setattr(hub_formats, "roberta_to_hf", buggy)


@pytest.mark.parametrize("inject", [_head_scale_too_large, _head_not_rescaled],
                         ids=["head-scale-too-large", "head-not-rescaled"])
def test_roberta_export_check_catches_injected_bugs(roberta_saved, tmp_path, monkeypatch, inject):
    ours, folder = roberta_saved
    inject(monkeypatch)
    mismatches = _roberta_mismatches(ours, export_model(folder, str(tmp_path / "out"), CARD))
    assert set(mismatches) == {"transformers logits"}, mismatches


@pytest.mark.parametrize("name", ["vit_tiny", "roberta_tiny"])
def test_saved_folder_round_trips_to_raysd(name, vit_saved, roberta_saved):
    ours, folder = vit_saved if name == "vit_tiny" else roberta_saved
    loaded, meta = load_classifier(folder)
    assert loaded.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert not any(k.startswith("backbone.decoder") for k in loaded.state_dict())
    assert meta["model"] == name and meta["metrics"] == {"val_accuracy": 0.75}
    assert meta["labels"] == list(IMAGE_LABELS if name == "vit_tiny" else TEXT_LABELS)


def test_incomplete_or_missing_folder_is_a_config_error(vit_saved, tmp_path):
    _, folder = vit_saved
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / MODEL_META).unlink()
    with pytest.raises(ConfigError, match=f"model folder {partial} is incomplete: no {MODEL_META}"):
        load_classifier(str(partial))
    with pytest.raises(ConfigError, match=f"model folder {partial} is incomplete"):
        export_model(str(partial), str(tmp_path / "out"), CARD)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=f"model folder {tmp_path / 'nowhere'} does not exist"):
        load_classifier(str(tmp_path / "nowhere"))
    shutil.copy(Path(folder) / MODEL_META, partial / MODEL_META)
    (partial / WEIGHTS_FILE).unlink()
    with pytest.raises(ConfigError, match=f"model folder {partial}: {WEIGHTS_FILE} does not load"):
        load_classifier(str(partial))


def test_a_rewrite_unmarks_the_folder_first_and_marks_it_last(roberta_saved, tmp_path, monkeypatch):
    """A restarted trial rewrites its folder: MODEL_META goes first and comes back last, so a
    reader never takes a half-written folder for a complete one."""
    ours, folder = roberta_saved
    shutil.copytree(folder, tmp_path / "model")
    events = []
    for method in ("write_bytes", "delete", "upload"):
        original = getattr(Store, method)

        def record(self, *args, _method=method, _original=original):
            events.append((_method, args[-1] if args and isinstance(args[-1], str) else None))
            return _original(self, *args)

        monkeypatch.setattr(Store, method, record)
    model_saver(str(tmp_path / "model"), {**load_classifier(folder)[1]})(ours, {})
    assert events[0] == ("delete", MODEL_META) and events[-1] == ("write_bytes", MODEL_META)
    assert ("upload", None) in events  # the tokenizer files, before the mark
    assert [e for e in events if e[1] == MODEL_META] == [events[0], events[-1]]


def test_export_refuses_a_folder_with_files(vit_saved, tmp_path):
    _, folder = vit_saved
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export_model(folder, str(tmp_path / "out"), CARD)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_trial_saves_its_model_before_its_last_report_and_again_after_a_restart(digits, tmp_path):
    """Saved by the recipe, complete when the last row is reported; a worker group restarted
    mid-fine-tuning saves it too, the same model (resume is exact)."""
    cfg = tiny_config({"evaluation.max_examples": 64}, method="finetune")
    torch.manual_seed(0)
    init = models.build("vit_tiny")
    folder = tmp_path / "model"
    complete_at_last_report, states = [], []

    def report(metrics, state):
        if state is not None:
            states.append(copy.deepcopy(state))
        if metrics.get("trial_done"):
            complete_at_last_report.append((folder / MODEL_META).exists())

    def run(resume=None):
        saver = model_saver(str(folder), describe(cfg, digits, init))
        return run_trial(cfg, digits, init, Hooks(report=report, resume=resume, save_model=saver))

    summary = run()
    assert complete_at_last_report == [True]
    whole, meta = load_classifier(str(folder))
    assert meta["metrics"]["val_accuracy"] == summary["val_accuracy"] and meta["num_classes"] == 10
    # The worker group died inside fine-tuning, before it saved: it resumes from a checkpoint.
    shutil.rmtree(folder)
    mid = [s for s in states if s.get("mid_stage")][0]
    run(resume=mid)
    assert complete_at_last_report == [True, True]
    resumed, _ = load_classifier(str(folder))
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in whole.state_dict().items())


@pytest.fixture
def s3(moto_s3, monkeypatch):
    """The session's moto S3 server, bucket `raysd`; pyarrow finds it through the environment."""
    for key, value in moto_s3.items():
        monkeypatch.setenv(key, value)
    return "s3://raysd"


def test_model_on_s3_saves_loads_and_exports(s3, tmp_path):
    """The tokenizer travels through object storage too."""
    ours, meta = _randomised_classifier("roberta_tiny", TEXT_LABELS)
    uri = f"{s3}/study/models/t0001"
    model_saver(uri, meta)(ours, {"val_accuracy": 0.5})
    loaded, _ = load_classifier(uri)
    batch = dict(ours.backbone.tokenizer(TEXTS, padding="max_length", max_length=24, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(loaded(batch), ours(batch))
    assert _roberta_mismatches(ours, export_model(uri, str(tmp_path / "out"), CARD)) == {}


def test_export_to_s3_writes_the_bucket_and_refuses_a_prefix_in_use(vit_saved, s3, tmp_path, monkeypatch):
    """It made a local folder named `s3:` instead."""
    from raysd.storage import Store

    _, folder = vit_saved
    monkeypatch.chdir(tmp_path)
    uri = f"{s3}/exports/vit"
    assert export_model(folder, uri, CARD) == uri
    written = Store(uri)
    assert {"config.json", "model.safetensors", "README.md", "timm"} <= set(written.list())
    assert "timm.create_model" in written.read_text("README.md")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=f"export: {uri} exists and is not empty"):
        export_model(folder, uri, CARD)
