"""The exit loop: a backbone whose blocks are each followed by the exit module."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from reefl.models.vit import VisionTransformer


class ExitModule(Protocol):
    """What the exit loop needs from an exit module (Ree, or per-exit heads)."""

    def after_block(self, block: int, h: torch.Tensor, history: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class EarlyExitModel(nn.Module):
    """Backbone + exit module. ``forward`` returns the logits of every exit, shallowest first.

    Everything is causal in depth, so a sub-model (fewer blocks, fewer exits) computes exactly
    the first exits of the full model on the same weights.
    """

    def __init__(self, backbone: VisionTransformer, exits: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.exits = exits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.backbone.embed(x)
        history: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for index, block in enumerate(self.backbone.blocks):
            h = block(h)
            h, out = self.exits.after_block(index, h, history)
            if out is not None:
                logits.append(out)
        return logits


class TierExits(nn.Module):
    """Exit k read from its own tier's model: ``forward`` returns ``[models[k](x)[k]]`` for
    every k, shallowest first (for methods whose tiers do not share one global forward pass,
    e.g. ScaleFL's narrower tiers). ``models[k]`` must have exits 0..k."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.tiers = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [model(x)[-1] for model in self.tiers]
