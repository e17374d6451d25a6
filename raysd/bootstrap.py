"""The demo's theta_init: a tiny ViT honestly MAE-pre-trained on general-domain images
(crops of scikit-learn's sample photographs), built on first use and cached on disk."""
from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from raysd import models
from raysd.cache import cache_root
from raysd.config import StageConfig, TrialConfig
from raysd.errors import ConfigError

# Changing any of these changes the cached weights' key, so old caches are never reused.
PRETRAIN = StageConfig(steps=600, batch_size=128, lr=1.5e-3, weight_decay=0.05, warmup_steps=50,
                       beta2=0.95)
CROPS, MASK_RATIO, SEED = 8192, 0.75, 0
VERSION = "1"


def demo_weights_dir(model_name: str) -> Path:
    """Directory of the pre-trained demo weights for `model_name`, building them if absent."""
    if models.family(model_name) != "vit":
        raise ConfigError(f"weights 'builtin:demo' exist for ViT models only, not {model_name!r}")
    key = f"{model_name}-v{VERSION}-{PRETRAIN.steps}x{PRETRAIN.batch_size}-{CROPS}"
    target = cache_root() / "demo_weights" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent trials wait for one builder
        if not (target / "raysd.json").exists():
            _build(model_name, target)
    return target


def _build(model_name: str, target: Path) -> None:
    import torch

    from raysd.data import Task
    from raysd.data.images import TensorImages, natural_crops
    from raysd.models.weights import save_backbone
    from raysd.recipe import Hooks, _StageContext, pretrain_stage

    print(f"raysd: pre-training the demo's {model_name} on natural-image crops (once; cached in "
          f"{target.parent})", flush=True)
    torch.manual_seed(SEED)
    size = models.VIT_SPECS[model_name].img_size
    crops = TensorImages(natural_crops(CROPS, size, SEED), torch.zeros(CROPS, dtype=torch.long), size)
    task = Task("builtin:natural_crops", "image", 1, crops, crops, crops, crops, ("accuracy",))
    cfg = TrialConfig(model=model_name, weights="none", data=task.source, method="further_pretrain",
                      mask_ratio=MASK_RATIO, further_pretrain=PRETRAIN, seed=SEED, log_every=100,
                      checkpoint_every=10**9)
    init = models.build(model_name)

    def report(metrics: dict, state) -> None:
        print(f"  step {metrics['step']:5d}  mae_loss {metrics['loss']:.4f}", flush=True)

    ctx = _StageContext(cfg, Hooks(report=report), cfg.stages(), 0, None, {})
    _, weights = pretrain_stage(cfg, task, init, init.state_dict(), None, ctx, None)
    init.load_state_dict(weights)
    tmp = target.with_name(target.name + ".tmp")
    save_backbone(init, tmp, model_name)
    tmp.rename(target)  # atomic: a half-built cache is never mistaken for a finished one
