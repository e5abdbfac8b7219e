"""InclusiveFL (Liu et al., KDD 2022): per-tier top blocks and heads, shared lower blocks, and
momentum distillation from deeper to shallower tiers (METHOD §6).

A tier-t client trains the backbone cut after exit t's block e_t with a single LayerNorm +
Linear head on that block's class token, on the CE of that one exit (no distillation).

**Global state.** The server holds one ViT trunk and, per tier, the parts that tier keeps
for itself (``InclusiveGlobalModel``):

* ``backbone.*``: patch embedding, class token, position embedding and the shared blocks
  ``backbone.blocks.{i}`` for i < e_{K−1}: everything below the deepest exit;
* ``tiers.{t}.block.*``: tier t's own copy of block e_t, its *top block*;
* ``tiers.{t}.exits.heads.0.*``: tier t's head (a one-exit ``PerExitHeads``).

A tier-t client's model names its top block ``backbone.blocks.{e_t}`` and its head
``exits.heads.0``; ``global_name`` maps one to the other for ``Method.tier_state`` (what a
client is sent, and its frozen weights) and for ``aggregate``. Block e_t thus exists twice
when t < K−1: tier t's copy and the shared ``backbone.blocks.{e_t}`` that the deeper tiers run
through. All copies start equal: deep copies of one freshly built block, overwritten by the
same checkpoint block when ``pretrained`` is set. In a regime other than ``full`` a copy's
LoRA/adapter/SSF parameters are per tier like the block itself, and momentum distillation
mixes their updates (the frozen block weights never change).

Choices where METHOD.md is silent:

* **Top block = the single block e_t**, not the run e_{t−1}+1..e_t. METHOD keeps "each
  tier's top block" per tier and passes updates "to the shallower tier's top block"
  (singular); InclusiveFL keeps only each model's top layer group-private so that the
  layers below stay shared with the deeper models. With K = L the two readings coincide;
  with K = 4, L = 12 the blocks e_{t−1}+1..e_t − 1 are shared by tiers t..K−1.
* **Aggregation**: the example-weighted mean over the clients that hold each parameter
  (METHOD §4's rule, with renamed tier copies): a tier copy is averaged over its own tier's
  clients; a shared parameter over every sampled client of every tier that holds it
  (equivalently: tier means weighted by each tier's example total). A parameter nobody
  returned keeps its value (no server step, FedAdam moments untouched).
* **Momentum distillation** acts on the top blocks' pseudo-gradients g_t = mean_t − w_t
  only (heads and shared blocks are left alone), deepest tier first:
  m_{K−1} = g_{K−1},  m_t = β·m_{t+1} + (1 − β)·g_t,  and m_t replaces g_t. So m_{t+1} is
  the deeper tier's already-mixed update and the deep knowledge is carried down every tier.
  A tier without clients this round gets no update (its top block keeps its value) and
  passes m_{t+1} on unchanged to tier t − 1; a tier with no deeper update uses its own g_t.
  β is ``inclusivefl-beta`` (0.2).
* **Server update** (``server-update``): ``fedavg`` applies the (mixed) pseudo-gradients with
  server learning rate 1 (w ← w + Δ, i.e. the plain mean where nothing was mixed);
  ``fedadam`` applies FedAdam (``federation.aggregate.FedAdam``, β1 0.9, β2 0.999, τ 1e-6,
  no bias correction, η = ``fedadam-lr``, default METHOD's 1e-3) to every returned
  parameter, with moments per global name. η 1e-3 suits fine-tuning a pretrained model;
  from scratch (the embedded default) the first step moves each weight by only ≈ 3.2e-3.
* **Evaluation**: exit k is read from tier k's own sub-model (shared trunk up to e_k − 1,
  then tier k's block and head); the global model's forward computes all K with one pass of
  the shared trunk, branching into each tier's top block.
* **Training metrics**: a tier-t client reports its single exit's CE as ``train-ce-exit{t}``
  (``exit_ids``), so each exit's training CE is the mean over that tier's sampled clients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from reefl.config import RunConfig, Setting
from reefl.federation.aggregate import AdamHyperParams, FedAdam, weighted_mean_per_key
from reefl.methods.base import ClientUpdate, HeldOutCE, Method, TaskSpec
from reefl.methods.losses import exit_cross_entropies
from reefl.models import Block, EarlyExitModel, PerExitHeads, VisionTransformer


def momentum_distillation(updates: list[dict[str, torch.Tensor]], beta: float
                          ) -> list[dict[str, torch.Tensor]]:
    """Mix each tier's top-block pseudo-gradient with the deeper tiers' (deepest first).

    ``updates[t]`` is g_t, tier t's top-block pseudo-gradient by block-relative parameter
    name, empty when no client of tier t returned it. Returns m_t per tier, with g_t's keys:
    m_t = β·m_{t+1} + (1 − β)·g_t, where m_{t+1} is the last mixed value from a deeper tier
    (a tier without update passes it on unchanged), and m_t = g_t when there is none.
    """
    carried: dict[str, torch.Tensor] = {}
    mixed: list[dict[str, torch.Tensor]] = [{} for _ in updates]
    for tier in reversed(range(len(updates))):
        for name, g in updates[tier].items():
            carried[name] = g if name not in carried else beta * carried[name] + (1 - beta) * g
        mixed[tier] = {name: carried[name] for name in updates[tier]}
    return mixed


class TierTop(nn.Module):
    """What one tier keeps for itself: its copy of the block of its exit, and its head."""

    def __init__(self, block_index: int, block: Block, exits: PerExitHeads) -> None:
        super().__init__()
        self.block_index = block_index
        self.block = block
        self.exits = exits

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The tier's logits from the tokens entering its top block."""
        _, logits = self.exits.after_block(self.block_index, self.block(h), [])
        return logits


class InclusiveGlobalModel(nn.Module):
    """The server's InclusiveFL model: the shared trunk (``backbone``, blocks below the
    deepest exit) and every tier's ``TierTop``. ``forward`` returns, for every tier k, the
    logits of tier k's own sub-model, in one pass of the shared blocks."""

    def __init__(self, backbone: VisionTransformer, tiers: list[TierTop]) -> None:
        super().__init__()
        self.backbone = backbone
        self.tiers = nn.ModuleList(tiers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.backbone.embed(x)
        logits, done = [], 0
        for top in self.tiers:
            for block in self.backbone.blocks[done:top.block_index]:
                h = block(h)
            done = top.block_index
            logits.append(top(h))
        return logits


class InclusiveFL(Method):
    """Tier t trains blocks 0..e_t and one head on CE; the server keeps each tier's top block
    and head apart, shares the rest, and distils deep tiers' top-block updates downwards."""

    name = "inclusivefl"
    settings = (Setting("inclusivefl-beta", 0.2, "a number in [0, 1]", lambda v: 0 <= v <= 1),)

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        super().__init__(cfg, task)
        self._adam = (FedAdam(AdamHyperParams(lr=cfg.fedadam_lr))
                      if cfg.server_update == "fedadam" else None)

    def _head(self, tier: int) -> PerExitHeads:
        return PerExitHeads(self.cfg.backbone["embed_dim"], self.task.num_classes,
                            [self.exit_blocks[tier]])

    def build_architecture(self, tier: int) -> EarlyExitModel:
        """The client's model: backbone cut after e_t, one head on block e_t."""
        return EarlyExitModel(self.build_backbone(tier), self._head(tier))

    def build_global_architecture(self) -> InclusiveGlobalModel:
        """Shared trunk plus, per tier, a copy of block e_t (all copies start equal) and a
        head; the deepest block e_{K−1} exists only as the deepest tier's copy."""
        trunk = self.build_backbone(self.num_exits - 1)
        tops = [TierTop(e, copy.deepcopy(trunk.blocks[e]), self._head(t))
                for t, e in enumerate(self.exit_blocks)]
        del trunk.blocks[-1]
        return InclusiveGlobalModel(trunk, tops)

    def exit_ids(self, tier: int) -> list[int]:
        """A tier's model has one exit: exit ``tier``."""
        return [tier]

    def global_name(self, name: str, tier: int) -> str:
        """Name in the global state of parameter ``name`` of tier ``tier``'s model."""
        top = f"backbone.blocks.{self.exit_blocks[tier]}."
        if name.startswith(top):
            return f"tiers.{tier}.block.{name[len(top):]}"
        if name.startswith("exits."):
            return f"tiers.{tier}.{name}"
        return name

    def new_loss_state(self, held_out: HeldOutCE | None = None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """CE of the tier's own (single, deepest) exit."""
        ces = exit_cross_entropies(logits[-1:], labels)
        return ces[0], [ces[0].item()]

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Per-parameter example-weighted means (tier copies within their tier), pseudo-
        gradients, momentum distillation of the top blocks, then the server step."""
        renamed = [({self.global_name(k, u.tier): v for k, v in u.state.items()},
                    u.num_examples) for u in updates]
        averaged = weighted_mean_per_key(global_state, renamed)
        returned = {k for state, _ in renamed for k in state}
        deltas = {k: averaged[k] - w for k, w in global_state.items() if k in returned}
        deltas = self._distil(deltas)
        if self._adam is not None:
            return self._adam.step(global_state, deltas)
        return {k: w + deltas[k] if k in deltas else w for k, w in global_state.items()}

    def _distil(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``deltas`` with every tier's top-block pseudo-gradient replaced by its mix."""
        prefixes = [f"tiers.{t}.block." for t in range(self.num_exits)]
        per_tier = [{k[len(p):]: d for k, d in deltas.items() if k.startswith(p)}
                    for p in prefixes]
        mixed = momentum_distillation(per_tier, self.cfg.inclusivefl_beta)
        return {**deltas, **{p + name: d for p, tier_mix in zip(prefixes, mixed, strict=True)
                             for name, d in tier_mix.items()}}
