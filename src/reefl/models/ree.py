"""Ree, the recurrent early-exit module shared by every exit and every tier (docs/method.md §2).

After each backbone block Ree reads the sequence [meta token, class tokens of the earlier
blocks, the current class token], plus a learned depth position embedding, through a small
pre-LN transformer. Its meta output (plus the current class token) feeds the single exit head;
its last output replaces the backbone's class token ("modulation") and joins the history.

``layer_scale`` (the ``ree-layer-scale`` setting; docs/method.md §2a) scales both residual
branches of Ree's layers by a learnt per-channel gain that starts small (LayerScale, as in
CaiT and DINOv2). A fresh Ree is then close to the identity on its tokens, so on a pretrained
backbone the first steps cannot push the modulated class token far from the one the next
blocks were trained on. ``None`` is the paper's Ree, parameter for parameter.

Shapes in the comments: B batch, N the backbone's tokens, D width, C classes, L the full
backbone's depth, M Ree's sequence (the meta token, the history, the current class token:
M = 2 + len(history) ≤ L + 1).
"""

from __future__ import annotations

import torch
from torch import nn

from reefl.models.heads import ExitHead
from reefl.models.vit import Block, trunc_normal_


class Ree(nn.Module):
    """The exit module of ReeFL; ``after_block`` is called by the exit loop after every block.

    ``num_blocks`` is the depth L of the *full* backbone (the position embedding has L + 1
    rows whatever tier uses it), ``exit_blocks`` the blocks of this (sub-)model's exits.
    """

    def __init__(self, dim: int, num_classes: int, num_blocks: int, exit_blocks: list[int],
                 num_heads: int = 8, attn_dim: int = 16, mlp_ratio: float = 1.35,
                 depth: int = 1, recurrent_steps: int = 1, modulation: bool = True,
                 layer_scale: float | None = None, standardise: bool = False) -> None:
        super().__init__()
        self.exit_blocks = list(exit_blocks)
        self.modulation = modulation
        self.recurrent_steps = recurrent_steps
        self.meta_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_blocks + 1, dim))
        self.layers = nn.ModuleList(
            Block(dim, num_heads, int(mlp_ratio * dim), eps=1e-5, attn_dim=attn_dim,
                  attn_scale=attn_dim**-0.5, layer_scale=layer_scale)
            for _ in range(depth)
        )
        self.head = ExitHead(dim, num_classes, standardise=standardise)
        trunc_normal_(self.meta_token)
        trunc_normal_(self.pos_embed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ree's transformer on (B, M, D) tokens (position embedding added here)."""
        out = tokens + self.pos_embed[:, : tokens.shape[1]]  # (B, M, D)
        for layer in self.layers:
            for _ in range(self.recurrent_steps):
                out = layer(out)  # (B, M, D)
        return out

    def after_block(self, block: int, h: torch.Tensor, history: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run Ree after backbone block ``block``; return the (modulated) tokens and the
        exit logits if this block has an exit. ``history`` is the per-forward state."""
        is_exit = block in self.exit_blocks
        current = h[:, :1]  # (B, 1, D): the class token; h is (B, N, D)
        if not (is_exit or self.modulation):  # nothing reads Ree's output here
            history.append(current)
            return h, None
        meta = self.meta_token.expand(h.shape[0], -1, -1)  # (B, 1, D)
        out = self.transform(torch.cat([meta, *history, current], dim=1))  # (B, M, D)
        logits = self.head(out[:, 0] + current[:, 0]) if is_exit else None  # (B, C)
        if self.modulation:
            modulated = out[:, -1:]  # (B, 1, D)
            history.append(modulated)
            h = torch.cat([modulated, h[:, 1:]], dim=1)  # (B, N, D)
        else:
            history.append(current)
        return h, logits
