"""Exit classifiers: the exit head (LayerNorm then Linear, on one token), and one head per
exit as the baselines' exit module."""

from __future__ import annotations

import torch
from torch import nn

from reefl.models.vit import trunc_normal_


class Standardise(nn.Module):
    """Per-feature standardisation of an exit's input token by running statistics
    (docs/method.md §2b): ``(x − mean) / sqrt(var + eps)`` with the running mean and variance.
    Training first moves them towards the batch's (momentum 0.1, no gradient), then
    standardises with them, so training and evaluation compute the same function (unlike
    BatchNorm, which trains on the batch's own statistics). They are float buffers that
    travel with the exit's parameters: the server's average of them is the federation's
    estimate.

    Why: a pretrained ViT's shallow class tokens are nearly one vector for every image; the
    head's LayerNorm keeps that shared vector, and the part that tells images apart is a
    tiny share of what the classifier sees. Removing the mean per feature leaves that part.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, token: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        if self.training and token.shape[0] > 1:  # one sample has no variance
            with torch.no_grad():
                sample = token.detach().float()
                self.running_mean.lerp_(sample.mean(0), self.momentum)
                self.running_var.lerp_(sample.var(0), self.momentum)
        return (token - self.running_mean) * torch.rsqrt(self.running_var + self.eps)


class ExitHead(nn.Module):
    """Classifier of one exit. LayerNorm eps 1e-5 as in docs/method.md §2 (the backbone uses
    1e-6). With ``standardise`` (run-config ``exit-standardise``) a ``Standardise`` comes
    first; without it the head is exactly the paper's."""

    def __init__(self, dim: int, num_classes: int, eps: float = 1e-5,
                 standardise: bool = False) -> None:
        super().__init__()
        self.standardise = Standardise(dim) if standardise else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, token: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, classes)
        return self.fc(self.norm(self.standardise(token)))


class PerExitHeads(nn.Module):
    """One ``ExitHead`` per exit on that exit block's class token; nothing else (docs/method.md §6).

    The exit module of the baselines (and of ReeFL's ``exit-module = "heads"`` ablation): no
    shared module, no modulation, the backbone's tokens pass through untouched. The linear
    maps start like Ree's head (trunc-normal std 0.02, zero bias) so the ablation changes the
    structure only. Parameters are named ``heads.{k}.norm/fc`` for exit k.
    """

    def __init__(self, dim: int, num_classes: int, exit_blocks: list[int],
                 standardise: bool = False) -> None:
        super().__init__()
        self.exit_blocks = list(exit_blocks)
        self.heads = nn.ModuleList(ExitHead(dim, num_classes, standardise=standardise)
                                   for _ in self.exit_blocks)
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
