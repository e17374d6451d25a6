"""Where theta_init, phi_init come from: a hub name, a local directory, the demo's cache, or none.

Sources: `none` (random), `builtin:demo` (a ViT MAE-pre-trained, or roberta_tiny masked-LM-
pre-trained, by raysd.bootstrap on first use),
`hf:ID[@REVISION]` (Hugging Face ViTMAE / RoBERTa checkpoint, encoder and decoder; a revision
- branch, tag or commit - pins what a study downloads), `timm:NAME`
(timm encoder weights, fresh decoder), or a local directory saved by raysd or by transformers.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from raysd import models
from raysd.errors import ConfigError

RAYSD_META = "raysd.json"
WEIGHTS_FILE = "model.safetensors"
SHOWN_KEYS = 4  # how many missing/unexpected names an error lists before "and N more"
# Checkpoint tensors a RobertaForMaskedLM leaves out on purpose: roberta-base ships a pooler,
# and the masked LM (like f(x), the raw <s> vector) has none.
ROBERTA_UNUSED = ("roberta.pooler.",)

log = logging.getLogger("raysd")


def save_backbone(backbone: nn.Module, directory: str | Path, model_name: str) -> Path:
    """raysd's own format: raysd.json + model.safetensors (+ tokenizer files for text models)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(_untie(state), str(directory / WEIGHTS_FILE))
    (directory / RAYSD_META).write_text(json.dumps({"model": model_name, "family": backbone.family}))
    if getattr(backbone, "tokenizer", None) is not None:
        backbone.tokenizer.save_pretrained(str(directory))
    return directory


def _untie(state: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): store each tensor once, cloned."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def load_backbone(model_name: str, weights: str) -> nn.Module:
    """Build `model_name` and apply `weights`; raises ConfigError on a source that cannot apply."""
    if model_name not in models.names():
        raise ConfigError(f"unknown model {model_name!r} (known: {', '.join(models.names())})")
    fam = models.family(model_name)
    backbone = models.build(model_name)
    if weights in ("", "none", None):
        return backbone
    if weights == "builtin:demo":  # built by raysd itself, above the models layer
        raise ConfigError("weights 'builtin:demo' are loaded by raysd.bootstrap.theta_init")
    if weights.startswith("hf:"):
        return _load_hf(backbone, fam, *hub_id(weights))
    if weights.startswith("timm:"):
        if fam != "vit":
            raise ConfigError(f"weights {weights!r}: timm weights only apply to ViT models")
        import timm

        source = timm.create_model(weights[5:], pretrained=True, num_classes=0)
        _load_state(backbone.encoder, source.state_dict(), weights)
        log.warning("weights %s: timm has the encoder only; the MAE decoder starts fresh (random init)",
                    weights)
        return backbone
    return _load_dir(backbone, _local_dir(weights), model_name)


def _local_dir(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise ConfigError(f"weights {weights!r}: not a directory, and not none/builtin:demo/hf:/timm:")
    return path


def hub_id(weights: str) -> tuple[str, str | None]:
    """`hf:ID@REVISION` -> (ID, REVISION or None)."""
    name, _, revision = weights[3:].partition("@")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"weights {weights!r}: expected hf:OWNER/NAME[@REVISION] or hf:DIR")
    if "@" in weights and not re.fullmatch(r"[\w./-]+", revision):
        raise ConfigError(f"weights {weights!r}: empty or malformed revision after '@'")
    return name, revision or None


def check_weights(model_name: str, weights: str) -> None:
    """Everything knowable about a weights source without the network or loading tensors:
    the source exists, is in a known format, and fits `model_name`. ConfigError otherwise."""
    fam = models.family(model_name)
    if weights in ("", "none"):
        return
    if weights == "builtin:demo":  # raysd.bootstrap builds them; roberta_base's would take days
        if fam != "vit" and model_name != "roberta_tiny":
            raise ConfigError(f"weights 'builtin:demo' exist for ViT models and roberta_tiny only, "
                              f"not {model_name!r}")
        return
    if weights.startswith("hf:"):
        hub_id(weights)
        return
    if weights.startswith("timm:"):
        import timm

        if fam != "vit":
            raise ConfigError(f"weights {weights!r}: timm weights only apply to ViT models")
        if not timm.is_model(weights[5:].split(".")[0]):
            raise ConfigError(f"weights {weights!r}: timm has no model {weights[5:].split('.')[0]!r}")
        return
    path = _local_dir(weights)
    if (path / RAYSD_META).exists():
        meta = json.loads((path / RAYSD_META).read_text())
        if meta.get("model") != model_name:
            raise ConfigError(f"weights {path}: saved for model {meta.get('model')!r}, not {model_name!r}")
        if not (path / WEIGHTS_FILE).is_file():
            raise ConfigError(f"weights {path}: {WEIGHTS_FILE} is missing")
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in models.build(model_name).state_dict().items()}
        with safe_open(str(path / WEIGHTS_FILE), "pt") as saved:
            found = {k: tuple(saved.get_slice(k).get_shape()) for k in saved.keys()}
        problems = _misfit(expected, found)
        if problems:
            raise ConfigError(f"weights {path}: do not fit {model_name} ({problems})")
        return
    if (path / "config.json").exists():
        kind = json.loads((path / "config.json").read_text()).get("model_type")
        wanted = {"vit": "vit_mae", "roberta": "roberta"}[fam]
        if kind != wanted:
            raise ConfigError(f"weights {path}: a {kind!r} checkpoint, {model_name} needs {wanted!r}")
        return
    raise ConfigError(f"weights {path}: no {RAYSD_META} or config.json inside")


def _load_dir(backbone: nn.Module, path: Path, model_name: str) -> nn.Module:
    if (path / RAYSD_META).exists():
        meta = json.loads((path / RAYSD_META).read_text())
        if meta["model"] != model_name:
            raise ConfigError(f"weights {path}: saved for model {meta['model']!r}, not {model_name!r}")
        _load_state(backbone, load_file(str(path / WEIGHTS_FILE)), str(path))
        if backbone.family == "roberta":
            backbone.load_tokenizer(str(path))
        return backbone
    if (path / "config.json").exists():
        return _load_hf(backbone, backbone.family, str(path))
    raise ConfigError(f"weights {path}: no {RAYSD_META} or config.json inside")


def _load_hf(backbone: nn.Module, fam: str, name_or_path: str,
             revision: str | None = None) -> nn.Module:
    """A transformers checkpoint must hold every tensor of the model, and nothing else: a
    missing one would silently stay at its random init (an encoder-only ViTMAEModel has no
    decoder, its mask token and position embedding would be zeros)."""
    if fam == "vit":
        from transformers import ViTMAEForPreTraining

        hf = _hf_checked(ViTMAEForPreTraining, name_or_path, revision)
        _load_state(backbone, vit_state_from_hf(hf.state_dict(), source=name_or_path), name_or_path)
    else:
        from transformers import RobertaForMaskedLM

        backbone.load_hf(name_or_path, revision)  # architecture, tokenizer and missing keys
        # load_hf does not look at unexpected tensors; a second read of the files (the hub's
        # are cached by now) checks them until it does.
        _hf_checked(RobertaForMaskedLM, name_or_path, revision, unused=ROBERTA_UNUSED)
    return backbone


def _hf_checked(cls, name_or_path: str, revision: str | None, unused: tuple[str, ...] = ()) -> nn.Module:
    """cls.from_pretrained, with a ConfigError for a checkpoint that lacks, adds or reshapes tensors."""
    try:
        hf, info = cls.from_pretrained(name_or_path, revision=revision, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"weights {name_or_path!r}: {str(err).strip().splitlines()[0]}") from None
    unexpected = {k for k in info["unexpected_keys"] if not k.startswith(unused)}
    problems = _name_keys("missing", info["missing_keys"]) + _name_keys("unexpected", unexpected)
    problems += _name_keys("of another shape", [str(m[0]) if isinstance(m, tuple) else str(m)
                                                 for m in info.get("mismatched_keys", ())])
    if problems:
        raise ConfigError(f"weights {name_or_path}: not a full {cls.__name__} checkpoint "
                          f"({'; '.join(problems)})")
    return hf


def _name_keys(what: str, keys) -> list[str]:
    """["3 missing: a, b, c"], the first SHOWN_KEYS names then a count; [] for no keys."""
    keys = sorted(keys)
    if not keys:
        return []
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return [f"{len(keys)} {what}: {', '.join(keys[:SHOWN_KEYS])}{more}"]


def _misfit(expected: dict, found: dict) -> str:
    """What keeps tensors `found` (name -> shape) from loading into a model with `expected`; '' if nothing."""
    problems = _name_keys("missing", expected.keys() - found.keys())
    problems += _name_keys("unexpected", found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if reshaped:
        k = reshaped[0]
        problems += _name_keys("of another shape", reshaped)
        problems[-1] += f" ({k}: saved {found[k]}, model {expected[k]})"
    return "; ".join(problems)


def _load_state(module: nn.Module, state: dict, source: str) -> None:
    """module.load_state_dict(state), all of it: a missing, unexpected or reshaped tensor is a ConfigError."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = _misfit(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise ConfigError(f"weights {source}: do not fit this model ({problems})")
    module.load_state_dict(state)


# A timm Block's part -> its name in a transformers ViT layer: transformers 5 first, 4.x
# second. Loading (hf -> raysd) and raysd.export (raysd -> hf) read the same table.
VIT_LAYER_KEYS = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}


def _hf_layer(prefix: str, hf: dict, out: str, dst: dict) -> None:
    """One transformers ViT layer -> one timm Block (q, k, v fused into qkv)."""
    new = f"{prefix}.attention.q_proj.weight" in hf

    def get(part: str, kind: str) -> torch.Tensor:
        return hf[f"{prefix}.{VIT_LAYER_KEYS[part][0 if new else 1]}.{kind}"]

    for kind in ("weight", "bias"):
        dst[f"{out}.attn.qkv.{kind}"] = torch.cat([get(p, kind) for p in "qkv"], dim=0)
        for part in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            dst[f"{out}.{part}.{kind}"] = get(part, kind)


def vit_state_from_hf(hf: dict, source: str = "transformers") -> dict:
    """transformers ViTMAEForPreTraining state dict -> MaeViT state dict; every tensor has its place."""
    used: set[str] = set()

    class Tracked(dict):  # records what the conversion read, so that nothing is dropped unseen
        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    hf = Tracked(hf)
    out = {
        "encoder.cls_token": hf["vit.embeddings.cls_token"],
        "encoder.pos_embed": hf["vit.embeddings.position_embeddings"],
        "encoder.patch_embed.proj.weight": hf["vit.embeddings.patch_embeddings.projection.weight"],
        "encoder.patch_embed.proj.bias": hf["vit.embeddings.patch_embeddings.projection.bias"],
        "encoder.norm.weight": hf["vit.layernorm.weight"],
        "encoder.norm.bias": hf["vit.layernorm.bias"],
        "decoder.embed.weight": hf["decoder.decoder_embed.weight"],
        "decoder.embed.bias": hf["decoder.decoder_embed.bias"],
        "decoder.mask_token": hf["decoder.mask_token"],
        "decoder.pos_embed": hf["decoder.decoder_pos_embed"],
        "decoder.norm.weight": hf["decoder.decoder_norm.weight"],
        "decoder.norm.bias": hf["decoder.decoder_norm.bias"],
        "decoder.pred.weight": hf["decoder.decoder_pred.weight"],
        "decoder.pred.bias": hf["decoder.decoder_pred.bias"],
    }
    for hf_prefix, ours in (("vit.layers.", "encoder.blocks."), ("vit.encoder.layer.", "encoder.blocks."),
                            ("decoder.decoder_layers.", "decoder.blocks.")):
        layers = {int(k[len(hf_prefix):].split(".")[0]) for k in hf if k.startswith(hf_prefix)}
        for i in sorted(layers):
            _hf_layer(f"{hf_prefix}{i}", hf, f"{ours}{i}", out)
    left = _name_keys("not converted", hf.keys() - used)
    if left:
        raise ConfigError(f"weights {source}: raysd does not know where these ViTMAE tensors go ({left[0]})")
    return out
