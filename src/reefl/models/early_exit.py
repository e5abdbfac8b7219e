"""The exit loop: a backbone whose blocks are each followed by the exit module.

Shapes in the comments: B batch, B' ≤ B the samples still going (early-exit inference),
N tokens, D width, C classes, E exits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from reefl.models.vit import VisionTransformer


class ExitModule(Protocol):
    """What the exit loop needs from an exit module (Ree, or per-exit heads).

    ``history`` holds per-sample tensors (batch first): the early-stopping loop
    (``EarlyExitModel.forward_until``) drops the rows of samples that have exited from it."""

    def after_block(self, block: int, h: torch.Tensor, history: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


ExitCallback = Callable[[int, torch.Tensor], "torch.Tensor | None"]
"""Called with (exit index, that exit's logits) as the exit loop reaches each exit; it
returns a boolean mask of the samples that stop there, or None to let every sample go on."""


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
        return self.exit_loop(x)

    def exit_loop(self, x: torch.Tensor, on_exit: ExitCallback | None = None
                  ) -> list[torch.Tensor]:
        """The blocks and the exit module in turn; the logits of every exit reached.

        With ``on_exit``, the samples it marks stop: their rows leave the tokens and the exit
        module's history, so deeper blocks compute only for the samples still going (each
        exit's logits then cover the samples that reached it, in their original order).
        Every sample stops at the last exit. Without it, this is the plain forward pass.
        """
        h = self.backbone.embed(x)  # (B, N, D)
        history: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for index, block in enumerate(self.backbone.blocks):
            h = block(h)  # (B', N, D)
            h, out = self.exits.after_block(index, h, history)  # (B', N, D), (B', C) or None
            if out is None:
                continue
            logits.append(out)  # one (B', C) per exit reached
            stop = on_exit(len(logits) - 1, out) if on_exit is not None else None
            if stop is not None and index < len(self.backbone.blocks) - 1:
                going = ~stop  # (B',) bool
                if not bool(going.any()):
                    break
                h = h[going]  # the new B' rows: (B', N, D)
                history[:] = [t[going] for t in history]  # each (B', ...)
        return logits

    def forward_until(self, x: torch.Tensor, stop: ExitCallback
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-exit inference: each sample leaves at the first exit where ``stop`` marks it
        (or at the last exit), and nothing deeper is computed for it. Returns the logits of
        the exit each sample took (B, C) and that exit's index (B,)."""
        batch = x.shape[0]
        remaining = torch.arange(batch, device=x.device)  # (B',): who is still going
        taken = torch.full((batch,), -1, dtype=torch.long, device=x.device)  # (B,)
        chosen: torch.Tensor | None = None

        def record(k: int, out: torch.Tensor) -> torch.Tensor:
            nonlocal remaining, chosen
            # out: (B', C); here: (B',) bool
            here = stop(k, out).bool() if k < self.num_exits - 1 else \
                torch.ones(len(out), dtype=torch.bool, device=out.device)
            if chosen is None:
                chosen = out.new_zeros(batch, out.shape[-1])  # (B, C)
            chosen[remaining[here]] = out[here]
            taken[remaining[here]] = k
            remaining = remaining[~here]  # (B',) for the next exit
            return here

        self.exit_loop(x, record)
        assert chosen is not None and bool((taken >= 0).all())
        return chosen, taken

    @property
    def num_exits(self) -> int:
        """How many exits ``forward`` returns."""
        blocks = getattr(self.exits, "exit_blocks", None)
        if blocks is None:
            raise TypeError(f"{type(self.exits).__name__} does not list its exit_blocks")
        return len(blocks)


class TierExits(nn.Module):
    """Exit k read from its own tier's model: ``forward`` returns ``[models[k](x)[k]]`` for
    every k, shallowest first (for methods whose tiers do not share one global forward pass,
    e.g. ScaleFL's narrower tiers). ``models[k]`` must have exits 0..k."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.tiers = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [model(x)[-1] for model in self.tiers]  # E × (B, C)
