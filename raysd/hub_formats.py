"""raysd's saved Classifier in the hub's formats: transformers' ViTForImageClassification and
RobertaForSequenceClassification, and timm's VisionTransformer. Ray-free; transformers and timm
are imported by the functions that use them. `raysd export` (export.py) writes these."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from raysd.models import Classifier
from raysd.models.vit import ViTSpec
from raysd.models.weights import VIT_LAYER_KEYS

TIMM_WEIGHTS = "model.safetensors"  # the file timm.create_model(pretrained_cfg_overlay=...) loads
TIMM_LN_EPS = 1e-6  # timm's LayerNorm eps: its config.json cannot set another
# RobertaForSequenceClassification's head is out_proj(tanh(dense(x))); raysd's is one linear
# layer. dense = s*I and out_proj = W/s reproduce it up to tanh(u)/u = 1 - u^2/3 + ...: s is
# chosen so that u = s*x_j stays below this for any x the last LayerNorm can output, a relative
# error below 3.4e-7 per feature.
ROBERTA_HEAD_MARGIN = 1e-3


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


def image_processor(meta: dict):
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
    (folder / TIMM_WEIGHTS).write_bytes(save_safetensors(state))
    (folder / "config.json").write_text(json.dumps(timm_config(meta), indent=1))


def vit_notes(meta: dict) -> list[str]:
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


def roberta_notes(scale: float) -> list[str]:
    return [
        "raysd's head is one linear layer on the last-layer <s> vector x: logits = W x + b. "
        "transformers' RobertaForSequenceClassification head is out_proj(tanh(dense(x))), which "
        f"cannot hold it exactly. This export sets dense = s*I (zero bias, s = {scale:.3e}) and "
        "out_proj = W/s, b: tanh(s x)/s = x to a relative 3.4e-7 or better for every x the last "
        "LayerNorm can output, so the logits match raysd's to float precision. To fine-tune "
        "further, re-initialise the classifier head.",
    ]
