"""Fine-tuned models: a trial's saved Classifier, and `raysd export` to transformers and timm. Ray-free.

A trial given a model URI (a local folder, s3://, gs://) leaves there, from rank 0:
    model.safetensors   the Classifier's state dict: backbone.encoder.* and head.weight/head.bias
    tokenizer files     RoBERTa models only (tokenizer.save_pretrained)
    raysd_model.json    written last, so its presence marks a complete folder: model, family,
                        architecture, classes and labels, input size or length, final metrics

export_model() turns such a folder into one that transformers loads as ViTForImageClassification
or RobertaForSequenceClassification (with AutoTokenizer), and for ViT also timm (OUT/timm);
export_trial() does so for a study's trial, `best` by study_folder.ranked. transformers is
imported by the functions that use it: a trial's workers only save the model, and the import
costs each of them seconds.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from raysd import __version__, hub_formats
from raysd.config import TrialConfig
from raysd.credentials import redact_values
from raysd.data.images import MEAN, STD
from raysd.errors import ConfigError
from raysd.model_card import TIMM_DIR, model_card
from raysd.paths import absolute_uri
from raysd.models import Classifier
from raysd.models.vit import MaeViT, ViTSpec
from raysd.storage import MODELS, Store
from raysd.study_folder import StudyFolder

MODEL_META = "raysd_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1  # of raysd_model.json; bump when the layout changes


def describe(cfg: TrialConfig, task: Any, backbone: nn.Module) -> dict:
    """raysd_model.json of a trial's fine-tuned model, less its final metrics."""
    meta = {"format": FORMAT, "model": cfg.model, "family": backbone.family,
            "num_classes": task.num_classes, "labels": _labels_of(task), "method": cfg.method,
            "weights": redact_values(cfg.weights), "data": redact_values(cfg.data), "raysd_version": __version__}
    if backbone.family == "vit":
        # The normalisation raysd's image loaders apply (raysd.data.images), kept with the model.
        meta.update(architecture=dataclasses.asdict(backbone.spec), image_size=backbone.spec.img_size,
                    mean=_floats(MEAN), std=_floats(STD))
    else:
        # Less transformers' default two labels, which are not the task's.
        architecture = {k: v for k, v in backbone.config.to_dict().items()
                        if k not in ("id2label", "label2id", "num_labels")}
        meta.update(architecture=architecture, max_length=cfg.max_length)
    return meta


def _floats(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values.flatten()]  # 0.485, not float32's 0.48500001430511475


def _labels_of(task: Any) -> list[str] | None:
    """Class names in class-index order, where the task knows them."""
    labels = getattr(task, "labels", None)
    return [str(name) for name in labels] if labels else None


def save_classifier(classifier: nn.Module, model_uri: str, meta: dict) -> None:
    """Write a fine-tuned Classifier to `model_uri`; MODEL_META last. A rewrite (a trial that
    restarted) first removes MODEL_META, so a half-rewritten folder never reads as complete."""
    classifier = getattr(classifier, "module", classifier)  # DDP
    store = _store(model_uri)
    if store.exists(MODEL_META):
        store.delete(MODEL_META)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    store.write_bytes(save_safetensors(state), WEIGHTS_FILE)
    tokenizer = getattr(classifier.backbone, "tokenizer", None)
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            store.upload(Path(tmp))
    store.write_text(json.dumps(meta, indent=1), MODEL_META)


def model_saver(model_uri: str, meta: dict) -> Callable[[nn.Module, dict], None]:
    """Hooks.save_model of a trial: (Classifier, final metrics) -> `model_uri`; meta from describe()."""
    def save(classifier: nn.Module, metrics: dict) -> None:
        save_classifier(classifier, model_uri, {**meta, "metrics": metrics})
    return save


def _store(uri: str) -> Store:
    return Store(absolute_uri(uri))


def read_meta(model_uri: str) -> dict:
    """raysd_model.json of a saved model; ConfigError when the folder is missing or incomplete."""
    store = _store(model_uri)
    if not store.exists():
        raise ConfigError(f"model folder {model_uri} does not exist")
    if not store.exists(MODEL_META):
        raise ConfigError(f"model folder {model_uri} is incomplete: no {MODEL_META} (the trial "
                          "did not finish saving it)")
    try:
        meta = json.loads(store.read_text(MODEL_META))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"model folder {model_uri}: {MODEL_META} is not JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"model folder {model_uri}: {MODEL_META} has format "
                          f"{meta.get('format')!r}, this raysd reads {FORMAT}")
    return meta


def load_classifier(model_uri: str) -> tuple[Classifier, dict]:
    """raysd's own Classifier from a saved model folder (in eval mode), and its raysd_model.json."""
    meta = read_meta(model_uri)
    store = _store(model_uri)
    if meta["family"] == "vit":
        backbone = MaeViT(ViTSpec(**meta["architecture"]))
    else:
        from transformers import RobertaConfig

        from raysd.models.roberta import MaskedLMRoberta

        backbone = MaskedLMRoberta(RobertaConfig.from_dict(meta["architecture"]),
                                   _tokenizer(store, model_uri))
    classifier = Classifier(backbone, meta["num_classes"])
    try:
        classifier.load_state_dict(load_safetensors(store.read_bytes(WEIGHTS_FILE)))
    except (OSError, RuntimeError) as err:  # missing file, or tensors that do not fit
        raise ConfigError(f"model folder {model_uri}: {WEIGHTS_FILE} does not load "
                          f"({str(err).strip().splitlines()[0]})") from None
    return classifier.eval(), meta


def _tokenizer(store: Store, model_uri: str):
    """The tokenizer saved beside the weights (copied to a local folder first when remote)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if store.local:
            folder = store.root
        else:
            folder = tmp
            for name in store.list():
                if name not in (WEIGHTS_FILE, MODEL_META):
                    (Path(tmp) / name).write_bytes(store.read_bytes(name))
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"model folder {model_uri}: no tokenizer ({first})") from None


def export_model(model_uri: str, out_dir: str, card: dict) -> Path | str:
    """Write OUT: a transformers model folder (ViTForImageClassification with its image
    processor, or RobertaForSequenceClassification with its tokenizer), timm's under OUT/timm
    for ViT, and a README.md model card listing `card`. OUT, a local folder or a URI (s3://,
    gs://), must not exist or be empty; returns its absolute path, or the URI."""
    from transformers.utils import logging as hf_logging

    target = _destination(out_dir)
    hf_logging.disable_progress_bar()  # one line from raysd export, not transformers' bars
    classifier, meta = load_classifier(model_uri)
    if isinstance(target, Store):  # built locally, then uploaded; the card last, once all is there
        with tempfile.TemporaryDirectory() as tmp:
            _write_export(classifier, meta, card, Path(tmp))
            readme = (Path(tmp) / "README.md").read_text()
            (Path(tmp) / "README.md").unlink()
            target.upload(Path(tmp))
            target.write_text(readme, "README.md")
        return out_dir
    tmp = target.with_name(f".{target.name}.partial")  # renamed into place once complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_export(classifier, meta, card, tmp)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _destination(out_dir: str) -> Path | Store:
    """Where `raysd export` writes: a local folder or an object-store prefix, either empty or
    absent; ConfigError otherwise (an unknown scheme included)."""
    if "://" in out_dir:
        store = Store(out_dir)
        if store.list():
            raise ConfigError(f"export: {out_dir} exists and is not empty")
        return store
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out} exists and is not an empty folder")
    return out


def _write_export(classifier: Classifier, meta: dict, card: dict, folder: Path) -> None:
    if meta["family"] == "vit":
        hub_formats.vit_to_hf(classifier, meta).save_pretrained(folder)
        hub_formats.image_processor(meta).save_pretrained(folder)
        hub_formats.save_timm(classifier, meta, folder / TIMM_DIR)
        notes = hub_formats.vit_notes(meta)
    else:
        hf, scale = hub_formats.roberta_to_hf(classifier, meta)
        hf.save_pretrained(folder)
        classifier.backbone.tokenizer.save_pretrained(folder)
        notes = hub_formats.roberta_notes(scale)
    (folder / "README.md").write_text(model_card(meta, card, notes))


def export_trial(study_uri: str, trial: str, out_dir: str) -> tuple[str, Path | str]:
    """`raysd export`: the saved model of a study's trial (`best`, or a trial id) with a card of
    its parameters and metrics; returns (trial id, OUT)."""
    _destination(out_dir)  # a destination that cannot be written is refused before anything is read
    folder = StudyFolder(study_uri)
    space = folder.space()
    row = folder.best() if trial == "best" else _trial_row(folder, trial)
    if row is None and trial == "best":
        raise ConfigError(f"{study_uri}: no completed trial with {space.study.metric} to export")
    if row is None:
        raise ConfigError(f"--trial {trial}: no such trial in {study_uri}")
    if "best_point" in row and folder.store.exists(MODELS, row["trial_id"]):
        kept = read_meta(f"{study_uri}/{MODELS}/{row['trial_id']}")["metrics"].get("rounds")
        if kept != row.get("cfg.self_distill.rounds"):  # a chain keeps its best point's model
            raise ConfigError(f"--trial {trial}: chain {row['trial_id']} kept the model of its "
                              f"best point, {row['trial_id']}@{kept}, not this one")
    card = {"trial_id": row["trial_id"], "study": study_uri, "method": row.get("cfg.method"),
            "params": {k[len("param."):]: v for k, v in row.items() if k.startswith("param.")},
            "metrics": {k: v for k, v in row.items()
                        if k.startswith(("val_", "test_")) or k in ("gen_gap", "init_distance")}}
    if not folder.store.exists(MODELS, row["trial_id"]):
        kept = space.study.keep_models
        raise ConfigError(f"trial {row['trial_id']}: no saved model in {study_uri}/{MODELS} "
                          f"(the study kept {kept!r} models; --keep-models all keeps every one)")
    return row["trial_id"], export_model(f"{study_uri}/{MODELS}/{row['trial_id']}", out_dir, card)


def _trial_row(folder, trial: str) -> dict | None:
    """The row `--trial` names: a trial id, whose best point in a chain study, or ID@T' for
    one point of a chain."""
    tid, _, point = trial.partition("@")
    trials = folder.trials()
    rows = trials[trials["trial_id"] == tid] if not trials.empty else trials
    if point:
        column = "cfg.self_distill.rounds"
        rows = rows[rows[column].astype(str) == point] if column in rows else rows.iloc[:0]
    elif "best_point" in rows and rows["best_point"].fillna(False).astype(bool).any():
        rows = rows[rows["best_point"].fillna(False).astype(bool)]
    if rows.empty:
        return None
    return {k: v for k, v in rows.iloc[0].items() if not (isinstance(v, float) and v != v)}
