"""What every backbone family shares: the one forward that DDP wraps."""
from __future__ import annotations

from torch import nn


class Backbone(nn.Module):
    """A family defines represent(batch, perturb) and masked prediction in three parts:
    draw_masking(batch, mask_ratio) -> masking, predict(batch, masking) -> reconstructions,
    reconstruction_loss(pred, batch, masking); forward combines them."""

    def forward(self, batch: dict, mask_ratio: float | None = None, represent: bool = False,
                masking: dict | None = None) -> dict:
        """One call for what a training step needs, so DDP sees a single forward: the MAE loss
        on a fresh mask (`mask_ratio`), f(x) (`represent`), reconstructions on a given mask."""
        out = {}
        if mask_ratio is not None:
            out["mae"] = self.mae_loss(batch, mask_ratio)
        if masking is not None:
            out["pred"] = self.predict(batch, masking)
        if represent:
            out["repr"] = self.represent(batch)
        return out

    def mae_loss(self, batch: dict, mask_ratio: float):
        masking = self.draw_masking(batch, mask_ratio)
        return self.reconstruction_loss(self.predict(batch, masking), batch, masking)
