"""theta_init for a trial, and the demo's: a tiny ViT honestly MAE-pre-trained on general-domain
images (crops of scikit-learn's sample photographs), built on first use as a stage artifact in
the machine's cache, so concurrent trials wait for one builder and never build it twice."""
from __future__ import annotations

import os
import socket
import time

import torch
from torch import nn

from raysd import __version__, models
from raysd.artifacts import METHOD_VERSION, ArtifactStore, digest
from raysd.cache import cache_root
from raysd.config import StageConfig, TrialConfig
from raysd.data.images import TensorImages, natural_crops
from raysd.errors import ConfigError
from raysd.models.weights import load_backbone
from raysd.stages import Hooks, StageRun, further_pretrain

# Everything here is part of the demo artifact's key: change one and a new artifact is built.
PRETRAIN = StageConfig(steps=600, batch_size=128, lr=1.5e-3, weight_decay=0.05, warmup_steps=50,
                       beta2=0.95)
CROPS, MASK_RATIO, SEED = 8192, 0.75, 0


def theta_init(model_name: str, weights: str, seed: int) -> nn.Module:
    """The trial's (theta_init, phi_init). `weights: none` is drawn from the trial seed, so every
    rank and every restart draws the same."""
    if weights == "builtin:demo":
        backbone = models.build(model_name)
        backbone.load_state_dict(demo_theta(model_name))
        return backbone
    torch.manual_seed(seed)
    return load_backbone(model_name, weights)


def demo_store() -> ArtifactStore:
    return ArtifactStore(str(cache_root() / "artifacts"), owner=f"{socket.gethostname()}-{os.getpid()}")


def demo_key(model_name: str) -> str:
    return digest({"method_version": METHOD_VERSION, "demo": model_name, "stage": PRETRAIN,
                   "crops": CROPS, "mask_ratio": MASK_RATIO, "seed": SEED})


def demo_theta(model_name: str) -> dict[str, torch.Tensor]:
    """The demo's pre-trained weights for `model_name`, building them if no process has."""
    if models.family(model_name) != "vit":
        raise ConfigError(f"weights 'builtin:demo' exist for ViT models only, not {model_name!r}")
    store, key = demo_store(), demo_key(model_name)
    while (decision := store.claim(key)) == "wait":  # another process is building it
        time.sleep(2.0)
    if decision == "build":
        with store.building(key):
            weights, rows = _build(model_name)
            store.save(key, weights, {"key": key, "model": model_name, "first_row": rows[0],
                                      "row": rows[-1], "raysd_version": __version__})
    return store.load(key)[0]


def _build(model_name: str) -> tuple[dict, list[dict]]:
    print(f"raysd: pre-training the demo's {model_name} on natural-image crops (once; cached in "
          f"{cache_root() / 'artifacts'})", flush=True)
    size = models.VIT_SPECS[model_name].img_size
    crops = TensorImages(natural_crops(CROPS, size, SEED), torch.zeros(CROPS, dtype=torch.long), size)
    cfg = TrialConfig(model=model_name, weights="none", data="builtin:natural_crops",
                      method="further_pretrain", mask_ratio=MASK_RATIO, further_pretrain=PRETRAIN,
                      seed=SEED, log_every=max(1, PRETRAIN.steps // 6), checkpoint_every=10**9)
    torch.manual_seed(SEED)
    init = models.build(model_name)
    rows: list[dict] = []

    def report(metrics: dict, state) -> None:
        rows.append(metrics)
        print(f"  step {metrics['step']:5d}  mae_loss {metrics['loss']:.4f}", flush=True)

    run = StageRun(cfg, Hooks(report=report), "further_pretrain", 0)
    weights, last = further_pretrain(init, crops, run)
    return weights, rows + [last]
