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

from raysd import __version__
from raysd.config import TrialConfig
from raysd.credentials import redact_values
from raysd.data.images import MEAN, STD
from raysd.errors import ConfigError
from raysd.model_card import TIMM_DIR, model_card
from raysd.paths import absolute_uri
from raysd.models import Classifier
from raysd.models.weights import VIT_LAYER_KEYS
from raysd.models.vit import MaeViT, ViTSpec
from raysd.storage import MODELS, Store
from raysd.study_folder import StudyFolder

MODEL_META = "raysd_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1  # of raysd_model.json; bump when the layout changes
TIMM_LN_EPS = 1e-6  # timm's LayerNorm eps: its config.json cannot set another
# RobertaForSequenceClassification's head is out_proj(tanh(dense(x))); raysd's is one linear
# layer. dense = s*I and out_proj = W/s reproduce it up to tanh(u)/u = 1 - u^2/3 + ...: s is
# chosen so that u = s*x_j stays below this for any x the last LayerNorm can output, a relative
# error below 3.4e-7 per feature.
ROBERTA_HEAD_MARGIN = 1e-3


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
        vit_to_hf(classifier, meta).save_pretrained(folder)
        _image_processor(meta).save_pretrained(folder)
        save_timm(classifier, meta, folder / TIMM_DIR)
        notes = _vit_notes(meta)
    else:
        hf, scale = roberta_to_hf(classifier, meta)
        hf.save_pretrained(folder)
        classifier.backbone.tokenizer.save_pretrained(folder)
        notes = _roberta_notes(scale)
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


# ---- ViT: raysd (timm encoder) -> transformers ViTForImageClassification ---------------------

def _label_config(meta: dict) -> dict:
    if not meta["labels"]:
        return {"num_labels": meta["num_classes"]}
    return {"id2label": dict(enumerate(meta["labels"])),
            "label2id": {name: i for i, name in enumerate(meta["labels"])}}


def vit_to_hf(classifier: Classifier, meta: dict) -> nn.Module:
    """The same model as transformers' ViTForImageClassification: raysd's head reads the
    post-norm CLS vector, as transformers' classifier does."""
    from transformers import ViTConfig, ViTForImageClassification

    spec = ViTSpec(**meta["architecture"])
    config = ViTConfig(image_size=spec.img_size, patch_size=spec.patch_size, num_channels=spec.in_chans,
                       hidden_size=spec.embed_dim, num_hidden_layers=spec.depth,
                       num_attention_heads=spec.num_heads,
                       intermediate_size=int(spec.embed_dim * spec.mlp_ratio),  # timm's Mlp width
                       hidden_act="gelu", layer_norm_eps=spec.norm_eps, qkv_bias=True,
                       architectures=["ViTForImageClassification"], **_label_config(meta))
    hf = ViTForImageClassification(config)
    ours = {k.removeprefix("backbone.encoder."): v for k, v in classifier.state_dict().items()}
    state = {
        "vit.embeddings.cls_token": ours["cls_token"],
        "vit.embeddings.position_embeddings": ours["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "vit.layernorm.weight": ours["norm.weight"],
        "vit.layernorm.bias": ours["norm.bias"],
        "classifier.weight": ours["head.weight"],
        "classifier.bias": ours["head.bias"],
    }
    new = "vit.layers.0.attention.q_proj.weight" in hf.state_dict()
    prefix = "vit.layers" if new else "vit.encoder.layer"
    for i in range(spec.depth):
        names = {part: f"{prefix}.{i}.{pair[0 if new else 1]}" for part, pair in VIT_LAYER_KEYS.items()}
        for kind in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)  # timm fuses [q; k; v]
            state.update({f"{names['q']}.{kind}": q, f"{names['k']}.{kind}": k,
                          f"{names['v']}.{kind}": v})
            for part in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                state[f"{names[part]}.{kind}"] = ours[f"blocks.{i}.{part}.{kind}"]
    hf.load_state_dict(state)  # strict: every tensor of the model set, none left over
    return hf.eval()


def _image_processor(meta: dict):
    """raysd's image-folder preprocessing: shorter side to the model's size (bilinear), centre
    crop, scale to [0, 1], normalise with raysd's mean and std."""
    from transformers import BitImageProcessor

    size = meta["image_size"]
    return BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                             resample=2, do_center_crop=True, image_mean=meta["mean"],
                             image_std=meta["std"], do_convert_rgb=True)


def timm_config(meta: dict) -> dict:
    """config.json of OUT/timm: what timm.create_model("local-dir:...") builds and preprocesses."""
    spec = ViTSpec(**meta["architecture"])
    size = spec.img_size
    config = {
        "architecture": "vit_base_patch16_224",  # every shape below overrides its defaults
        "num_classes": meta["num_classes"],
        "model_args": {"img_size": size, "patch_size": spec.patch_size, "in_chans": spec.in_chans,
                       "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
                       "mlp_ratio": spec.mlp_ratio, "qkv_bias": True, "class_token": True,
                       "global_pool": "token"},
        # crop_pct 1: resize the shorter side to `size` and centre-crop, as raysd's loader.
        "pretrained_cfg": {"input_size": [spec.in_chans, size, size], "mean": meta["mean"],
                           "std": meta["std"], "crop_pct": 1.0, "crop_mode": "center",
                           "interpolation": "bilinear", "num_classes": meta["num_classes"]},
    }
    if meta["labels"]:
        config["label_names"] = meta["labels"]
    return config


def save_timm(classifier: Classifier, meta: dict, folder: Path) -> None:
    """timm's VisionTransformer is raysd's encoder: its tensors keep their names, plus the head."""
    folder.mkdir(parents=True)
    state = {k.removeprefix("backbone.encoder."): v.detach().contiguous()
             for k, v in classifier.state_dict().items()}
    (folder / WEIGHTS_FILE).write_bytes(save_safetensors(state))
    (folder / "config.json").write_text(json.dumps(timm_config(meta), indent=1))


def _vit_notes(meta: dict) -> list[str]:
    notes = [f"Inputs: {meta['image_size']}x{meta['image_size']} RGB, the shorter side resized "
             f"(bilinear) and centre-cropped, scaled to [0, 1], normalised with mean {meta['mean']} "
             f"and std {meta['std']} (the image processor and timm's config say the same)."]
    eps = meta["architecture"]["norm_eps"]
    if eps != TIMM_LN_EPS:
        notes.append(f"timm (OUT/timm) builds its LayerNorms with eps {TIMM_LN_EPS}; this model "
                     f"was trained with {eps}, which transformers' copy keeps. timm's logits "
                     "differ from raysd's by a few parts per million (4e-6 relative on a random "
                     "tiny ViT); transformers' match them to float precision.")
    return notes


# ---- RoBERTa: raysd -> transformers RobertaForSequenceClassification -------------------------

def roberta_head_scale(encoder: nn.Module) -> float:
    """s with |s * x_j| <= ROBERTA_HEAD_MARGIN for every feature x_j of the last hidden state:
    the last LayerNorm outputs gamma_j * z_j + beta_j, and a normalised z has |z_j| <= sqrt(D - 1)."""
    norm = encoder.encoder.layer[-1].output.LayerNorm
    width = norm.weight.numel()
    bound = float((norm.weight.abs() * (width - 1) ** 0.5 + norm.bias.abs()).max().detach())
    return ROBERTA_HEAD_MARGIN / max(bound, 1e-12)


def roberta_to_hf(classifier: Classifier, meta: dict) -> tuple[nn.Module, float]:
    """transformers' RobertaForSequenceClassification computing raysd's logits W x + b up to
    tanh's curvature: dense = s*I (zero bias), out_proj = W/s, b; so out_proj(tanh(dense(x)))
    = W tanh(s x)/s + b = W x (1 + O((s x)^2)) + b, relative error below 3.4e-7.
    Returns (model, s)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig.from_dict({**meta["architecture"], **_label_config(meta),
                                      "architectures": ["RobertaForSequenceClassification"]})
    hf = RobertaForSequenceClassification(config)
    encoder = classifier.backbone.encoder
    scale = roberta_head_scale(encoder)
    width = classifier.head.in_features
    state = {f"roberta.{k}": v for k, v in encoder.state_dict().items()}
    state.update({
        "classifier.dense.weight": scale * torch.eye(width),
        "classifier.dense.bias": torch.zeros(width),
        "classifier.out_proj.weight": classifier.head.weight.detach() / scale,
        "classifier.out_proj.bias": classifier.head.bias.detach(),
    })
    hf.load_state_dict(state)  # strict: every tensor of the model set, none left over
    return hf.eval(), scale


def _roberta_notes(scale: float) -> list[str]:
    return [
        "raysd's head is one linear layer on the last-layer <s> vector x: logits = W x + b. "
        "transformers' RobertaForSequenceClassification head is out_proj(tanh(dense(x))), which "
        f"cannot hold it exactly. This export sets dense = s*I (zero bias, s = {scale:.3e}) and "
        "out_proj = W/s, b: tanh(s x)/s = x to a relative 3.4e-7 or better for every x the last "
        "LayerNorm can output, so the logits match raysd's to float precision. To fine-tune "
        "further, re-initialise the classifier head.",
    ]
