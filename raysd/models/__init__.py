"""Model registry: name -> builder of a randomly initialised backbone.

A backbone is an nn.Module with `family`, `hidden_size`, an `encoder` (f_theta) and a
`decoder` (g_phi) submodule, and
  mae_loss(batch, mask_ratio) -> scalar     masked auto-encoding loss on the batch
  represent(batch, perturb=None) -> [B, D]  f(x) on the full, unmasked input (R3F: perturbed)
  draw_masking, predict, reconstruction_loss, prediction_distance   the parts of mae_loss,
                                            and the prediction-matching ablation's distance
  forward(batch, mask_ratio=None, represent=False, masking=None) -> {"mae", "repr", "pred"}
Weights are applied afterwards by raysd.models.weights.load_backbone.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from raysd.models.vit import MaeViT, ViTSpec

_REGISTRY: dict[str, tuple[str, Callable[[], nn.Module]]] = {}


def register(name: str, family: str):
    def wrap(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _REGISTRY[name] = (family, builder)
        return builder
    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def family(name: str) -> str:
    return _REGISTRY[name][0]


def build(name: str) -> nn.Module:
    return _REGISTRY[name][1]()


VIT_SPECS = {
    # Tiny entry for tests and the demo: 32x32 images, 64 patches of 4x4.
    "vit_tiny": ViTSpec(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        mlp_ratio=2.0, decoder_dim=64, decoder_depth=1, decoder_heads=4),
    # ViT-S/16 at 224 with a light decoder.
    "vit_small": ViTSpec(embed_dim=384, depth=12, num_heads=6, decoder_dim=256,
                         decoder_depth=4, decoder_heads=8),
    # The paper's model: ViT-B/16 MAE with the 8-layer, 512-wide decoder (facebook/vit-mae-base).
    "vit_base_mae": ViTSpec(embed_dim=768, depth=12, num_heads=12, decoder_dim=512,
                            decoder_depth=8, decoder_heads=16, norm_eps=1e-12),
}

for _name, _spec in VIT_SPECS.items():
    register(_name, "vit")(lambda spec=_spec: MaeViT(spec))


class Classifier(nn.Module):
    """Fine-tuning model: the backbone's encoder (decoder dropped) plus a fresh linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        backbone.decoder = None  # unused in fine-tuning; DDP would flag its parameters
        self.backbone = backbone
        self.head = nn.Linear(backbone.hidden_size, num_classes)

    def init_head(self) -> None:
        """As the reference's ViTForImageClassification: weights from a normal of std 0.02
        truncated at +-2, zero bias (from torch's global RNG)."""
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict, perturb=None):
        """Logits [B, num_classes]; with R3F's `perturb` of the input embeddings, [B', num_classes]."""
        return self.head(self.backbone.represent(batch, perturb))


def _roberta(size: str) -> Callable[[], nn.Module]:
    """A builder that imports raysd.models.roberta (and transformers, seconds of start-up in
    every Ray worker) only when a RoBERTa is built."""
    def build() -> nn.Module:
        from raysd.models import roberta

        return getattr(roberta, size)()
    return build


# RoBERTa family (text): roberta_tiny on the builtin:text tokenizer, roberta_base for hf:roberta-base.
register("roberta_tiny", "roberta")(_roberta("tiny"))
register("roberta_base", "roberta")(_roberta("base"))
