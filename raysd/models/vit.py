"""ViT family: timm's VisionTransformer as the encoder plus raysd's MAE decoder.

During masked auto-encoding the encoder sees only the visible patches (what makes MAE
cheap); the distillation representation is the post-norm CLS vector on all patches.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import torch
from torch import nn

from raysd.losses import mae_loss, masked_mse, patchify, shuffle_mask
from raysd.models.base import Backbone


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero CLS slot: [1, 1 + grid*grid, dim]."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]  # [M, d/2]
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")
    emb = torch.cat([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], dim=1)  # [grid*grid, dim]
    emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()[None]


class MaeDecoder(nn.Module):
    """MAE's light decoder: embeds visible latents, inserts mask tokens, predicts pixels."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        dim, grid = spec.decoder_dim, spec.img_size // spec.patch_size
        self.embed = nn.Linear(spec.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=spec.norm_eps)
        from timm.models.vision_transformer import Block  # timm (and torchvision) cost seconds:
        self.blocks = nn.ModuleList(                      # only processes that build a ViT pay
            Block(dim, spec.decoder_heads, spec.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(spec.decoder_depth)
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, spec.patch_size**2 * spec.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # [B, 1+V, Dd]
        b, v1, d = x.shape
        k = ids_restore.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, k + 1 - v1, d)], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, d))  # unshuffle: [B, K, Dd]
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # [B, K, p*p*C]


def build_encoder(spec: ViTSpec) -> nn.Module:
    """timm's VisionTransformer (imported here: Tune's trial drivers never build one)."""
    from timm.models.vision_transformer import VisionTransformer

    encoder = VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
        num_classes=0, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=spec.norm_eps),
    )
    # MAE keeps position embeddings fixed (sin-cos); so do we, for every ViT entry.
    encoder.pos_embed = nn.Parameter(
        sincos_pos_embed(spec.embed_dim, spec.img_size // spec.patch_size), requires_grad=False
    )
    return encoder


class MaeViT(Backbone):
    """Encoder f_theta + decoder g_phi. forward() serves both DDP-wrapped training passes."""

    family = "vit"

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.encoder = build_encoder(spec)
        self.decoder = MaeDecoder(spec)

    @property
    def hidden_size(self) -> int:
        return self.spec.embed_dim

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None,
               perturb: Callable | None = None) -> torch.Tensor:
        """Post-norm tokens [B', 1+V, D]; all patches when ids_keep is None. `perturb` maps the
        patch embeddings [B, K, D] to [B', K, D] before position embeddings are added (R3F)."""
        enc = self.encoder
        x = enc.patch_embed(images)  # [B, K, D]
        if perturb is not None:
            x = perturb(x)
        x = x + enc.pos_embed[:, 1:]
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, V, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        # pos_drop: the embeddings' dropout (the reference's hidden dropout; 0 unless fine-tuning)
        x = enc.norm_pre(enc.pos_drop(torch.cat([cls, x], dim=1)))
        return enc.norm(enc.blocks(x))

    def represent(self, batch: dict, perturb: Callable | None = None) -> torch.Tensor:
        """f(x): post-norm CLS vector of the full, unmasked image, [B, D] ([B', D] perturbed)."""
        return self.encode(batch["x"], perturb=perturb)[:, 0]

    def draw_masking(self, batch: dict, mask_ratio: float, noise: torch.Tensor | None = None) -> dict:
        images = batch["x"]
        ids_keep, ids_restore, mask = shuffle_mask(
            images.shape[0], self.spec.num_patches, mask_ratio, noise=noise, device=images.device
        )
        return {"ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask}

    def predict(self, batch: dict, masking: dict) -> torch.Tensor:
        """g(f(x^)): pixels of every patch from the visible ones, [B, K, p*p*C]."""
        return self.decoder(self.encode(batch["x"], masking["ids_keep"]), masking["ids_restore"])

    def reconstruction_loss(self, pred: torch.Tensor, batch: dict, masking: dict) -> torch.Tensor:
        return mae_loss(pred, patchify(batch["x"], self.spec.patch_size), masking["mask"])

    def prediction_distance(self, student: torch.Tensor, teacher: torch.Tensor, masking: dict) -> torch.Tensor:
        """||g(f(x^)) - g0(f0(x^))||^2 per pixel value, averaged over the masked patches."""
        return masked_mse(student, teacher, masking["mask"])

    def mae_loss(self, batch: dict, mask_ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
        masking = self.draw_masking(batch, mask_ratio, noise)
        return self.reconstruction_loss(self.predict(batch, masking), batch, masking)
