"""Exit classifiers: the exit head (LayerNorm then Linear, on one token), and one head per
exit as the baselines' exit module."""

from __future__ import annotations

import torch
from torch import nn

from reefl.models.vit import trunc_normal_


class ExitHead(nn.Module):
    """Classifier of one exit. LayerNorm eps 1e-5 as in docs/method.md §2 (the backbone uses
    1e-6)."""

    def __init__(self, dim: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(token))


class PerExitHeads(nn.Module):
    """One ``ExitHead`` per exit on that exit block's class token; nothing else (docs/method.md §6).

    The exit module of the baselines (and of ReeFL's ``exit-module = "heads"`` ablation): no
    shared module, no modulation, the backbone's tokens pass through untouched. The linear
    maps start like Ree's head (trunc-normal std 0.02, zero bias) so the ablation changes the
    structure only. Parameters are named ``heads.{k}.norm/fc`` for exit k.
    """

    def __init__(self, dim: int, num_classes: int, exit_blocks: list[int]) -> None:
        super().__init__()
        self.exit_blocks = list(exit_blocks)
        self.heads = nn.ModuleList(ExitHead(dim, num_classes) for _ in self.exit_blocks)
        for head in self.heads:
            trunc_normal_(head.fc.weight)
            nn.init.zeros_(head.fc.bias)

    def after_block(self, block: int, h: torch.Tensor, history: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exit's logits if ``block`` has an exit, else None; ``h`` and ``history`` are
        left as they are."""
        if block not in self.exit_blocks:
            return h, None
        return h, self.heads[self.exit_blocks.index(block)](h[:, 0])
