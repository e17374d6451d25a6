"""What every backbone family shares: the one forward that DDP wraps."""
from __future__ import annotations

from torch import nn


class Backbone(nn.Module):
    """A family defines mae_loss(batch, mask_ratio) and represent(batch); forward combines them."""

    def forward(self, batch: dict, mask_ratio: float | None = None, represent: bool = False) -> dict:
        """One call for what a training step needs, so DDP sees a single forward."""
        out = {}
        if mask_ratio is not None:
            out["mae"] = self.mae_loss(batch, mask_ratio)
        if represent:
            out["repr"] = self.represent(batch)
        return out
