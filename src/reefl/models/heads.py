"""The exit head: LayerNorm then Linear, on one token."""

from __future__ import annotations

import torch
from torch import nn


class ExitHead(nn.Module):
    """Classifier of one exit. LayerNorm eps 1e-5 as in METHOD §2 (the backbone uses 1e-6)."""

    def __init__(self, dim: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(token))
