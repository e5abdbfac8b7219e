"""InclusiveFL (Liu et al., KDD 2022): per-tier top blocks and heads, shared lower blocks, and
momentum distillation from deeper to shallower tiers (docs/method.md §6).

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

**Server update** (docs/method.md §6, as the official ``src/server/strategies/inclusivefl.py``,
``InclusiveFL.aggregate_fit``), ``aggregate``: the sampled tiers are processed shallowest
first; for each tier t with clients,

1. the example-weighted mean of its clients (``weighted_mean_per_key``; with DP on, the
   unweighted mean of their clipped updates plus noise, docs/privacy.md), and its
   pseudo-gradients g_t = mean_t − w over every parameter the tier returned, shared or its
   own (w the global value, the tier's own copy for its top block and head);
2. momentum distillation on its top block (t < K − 1 only; heads and shared blocks are left
   alone): g_t ← β·m̄_{t+1} + (1 − β)·g_t per parameter, with m̄_{t+1} the momentum tier t + 1
   left in the previous round (zero if tier t + 1 had no clients in that round, or it is
   round 1); β is ``inclusivefl-beta`` (0.2);
3. the tier's server step: ``fedavg`` w_t = w + g_t (the plain tier mean where nothing was
   mixed); ``fedadam`` one FedAdam step (``methods.aggregate.FedAdam``, β1 0.9, β2 0.999,
   τ 1e-6, no bias correction, η = ``fedadam-lr``, default the paper's 1e-3) along g_t, with
   one optimiser state per tier (the tier's moments for every parameter it holds, shared
   ones included, updated only in rounds it has clients);
4. tier t's momentum for the next round (t > 0): m̄_t = the element-wise mean over the blocks
   above tier t − 1's exit, e_{t−1}+1..e_t, of g_t's same-named tensors (block e_t's after
   step 2's mixing: the official code saves the mixed value; pre-Adam under ``fedadam``).

Then each tier's top block and head take w_t; a shared parameter becomes the mean of the
w_t of the tiers that returned it, weighted by their number of clients (not examples);
a parameter nobody returned keeps its value, and a tier without clients keeps its copies and
FedAdam state and leaves no momentum. With β = 0 and ``fedavg`` this is plain per-tier
averaging, exactly (tier means as they are, shared ones then client-weighted). The
momentum and the tiers' FedAdam states live on the method object, which lives on the server
for the whole run. η 1e-3 suits fine-tuning a pretrained model; from scratch (the embedded
default) the first step moves each weight by only ≈ 3.2e-3.

Choices where the method (docs/method.md) is silent:

* **Top block = the single block e_t**, as the official code for t < K − 1 (its
  ``personalized_block_id = (t + 1)·L/K − 1``, i.e. e_t with evenly spaced exits); the
  layers below stay shared with the deeper tiers, so with K = 4, L = 12 the blocks
  e_{t−1}+1..e_t − 1 are shared by tiers t..K−1. The official code keeps the deepest tier's
  whole last run e_{K−2}+1..e_{K−1} per tier; only that tier holds those blocks, so keeping
  them shared (``backbone.blocks.*``, except e_{K−1}) gives the same values.
* The blocks of the momentum follow ``exit-blocks`` (the official code assumes even spacing).
  A parameter name that some of those blocks lack is averaged over the blocks that have it
  (never the case: every block of a tier trains the same names).
* The official "no distillation" configs (``inclusiveFL_nodis_*.yaml``) do not select the
  InclusiveFL strategy (per-parameter averaging without per-tier copies); here it is
  ``inclusivefl-beta = 0``, this method with nothing mixed.
* **Evaluation**: exit k is read from tier k's own sub-model (shared trunk up to e_k − 1,
  then tier k's block and head); the global model's forward computes all K with one pass of
  the shared trunk, branching into each tier's top block.
* **Training metrics**: a tier-t client reports its single exit's CE as ``train-ce-exit{t}``
  (``exit_ids``), so each exit's training CE is the mean over that tier's sampled clients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from reefl.config import RunConfig, Setting
from reefl.methods.aggregate import AdamHyperParams, FedAdam, weighted_mean_per_key
from reefl.methods.base import ClientUpdate, HeldOutCE, Method, TaskSpec
from reefl.methods.losses import exit_cross_entropies
from reefl.models import Block, EarlyExitModel, PerExitHeads, VisionTransformer


def momentum_distillation(top_update: dict[str, torch.Tensor],
                          momentum: dict[str, torch.Tensor], beta: float
                          ) -> dict[str, torch.Tensor]:
    """A tier's top-block pseudo-gradient mixed with the deeper tier's momentum.

    ``top_update`` is g_t by block-relative parameter name; ``momentum`` is m̄_{t+1} by the
    same names (empty, i.e. zero, when the deeper tier left none). Returns
    β·m̄_{t+1} + (1 − β)·g_t for every name of g_t.
    """
    return {name: beta * momentum[name] + (1 - beta) * g if name in momentum
            else (1 - beta) * g for name, g in top_update.items()}


def block_mean(blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean over ``blocks`` (each: block-relative name -> tensor) of the tensors
    of each name, over the blocks that have it: a tier's momentum m̄_t from its
    pseudo-gradients of the blocks above the shallower tier's exit."""
    names = list(dict.fromkeys(name for block in blocks for name in block))
    means = {}
    for name in names:
        held = [block[name] for block in blocks if name in block]
        means[name] = torch.stack(held).sum(dim=0) / len(held)
    return means


@dataclass
class ServerState:
    """What InclusiveFL's server keeps across rounds: each tier's momentum m̄_t from the last
    round (absent: zero) and, under FedAdam, each tier's own optimiser."""

    momentum: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    adams: dict[int, FedAdam] = field(default_factory=dict)


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
    private_aggregate = True  # each tier's mean is clipped and noised before anything uses it
    settings = (Setting("inclusivefl-beta", 0.2, "a number in [0, 1]", lambda v: 0 <= v <= 1),)

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        super().__init__(cfg, task)
        self._server = ServerState()  # the state kept across rounds

    def _head(self, tier: int) -> PerExitHeads:
        return PerExitHeads(self.cfg.backbone["embed_dim"], self.task.num_classes,
                            [self.exit_blocks[tier]], self.cfg.exit_standardise)

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

    def server_state(self) -> dict[str, torch.Tensor]:
        """Each tier's momentum (``momentum/<tier>/<name>``) and FedAdam moments
        (``fedadam/<tier>/m|v/<name>``)."""
        state = {f"momentum/{t}/{k}": v for t, m in self._server.momentum.items()
                 for k, v in m.items()}
        state.update({f"fedadam/{t}/{k}": v for t, adam in self._server.adams.items()
                      for k, v in adam.state_dict().items()})
        return state

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._server = ServerState()
        for key, value in tensors.items():
            kind, tier, name = key.split("/", 2)
            if kind == "momentum":
                self._server.momentum.setdefault(int(tier), {})[name] = value
        for tier in {int(k.split("/")[1]) for k in tensors if k.startswith("fedadam/")}:
            prefix = f"fedadam/{tier}/"
            adam = FedAdam(AdamHyperParams(lr=self.cfg.fedadam_lr))
            adam.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                  if k.startswith(prefix)})
            self._server.adams[tier] = adam

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Tier by tier, shallowest first: the tier's mean, its pseudo-gradients with the
        top block distilled, its own server step and its momentum for the next round; then
        the tiers' own parameters set and the shared ones averaged over the tiers weighted by
        number of clients (module docstring)."""
        by_tier: dict[int, list[ClientUpdate]] = {}
        for update in updates:
            by_tier.setdefault(update.tier, []).append(update)
        merged = dict(global_state)
        shared_sum: dict[str, torch.Tensor] = {}
        shared_clients: dict[str, int] = {}
        momentum: dict[int, dict[str, torch.Tensor]] = {}
        for tier in sorted(by_tier):
            clients = by_tier[tier]
            stepped, deltas = self._tier_step(global_state, tier, clients)
            for key, value in stepped.items():
                if key.startswith("tiers."):
                    merged[key] = value
                else:
                    shared_sum[key] = shared_sum.get(key, 0) + value.to(torch.float64) * len(
                        clients)
                    shared_clients[key] = shared_clients.get(key, 0) + len(clients)
            if tier > 0:
                momentum[tier] = self._momentum(tier, deltas)
        for key, total in shared_sum.items():
            merged[key] = (total / shared_clients[key]).to(global_state[key].dtype)
        self._server.momentum = momentum  # a tier without clients leaves none (zero)
        return merged

    def _tier_step(self, global_state: dict[str, torch.Tensor], tier: int,
                   clients: list[ClientUpdate]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Tier ``tier``'s new value w_t of every parameter it returned and its (distilled)
        pseudo-gradients g_t, by global name."""
        renamed = [({self.global_name(k, tier): v for k, v in u.state.items()}, u.num_examples)
                    for u in clients]
        keys = list(dict.fromkeys(k for state, _ in renamed for k in state))
        weights = {k: global_state[k] for k in keys}
        if self.privacy.on:  # the tier's noised mean: momentum and FedAdam see only it
            mean = self.privacy.mean(weights, [state for state, _ in renamed])
        else:
            mean = weighted_mean_per_key(weights, renamed)
        deltas = {k: mean[k] - w for k, w in weights.items()}
        mixed = self._distil(tier, deltas)
        deltas.update(mixed)
        if self.cfg.server_update == "fedadam":
            adam = self._server.adams.setdefault(
                tier, FedAdam(AdamHyperParams(lr=self.cfg.fedadam_lr)))
            return adam.step(weights, deltas), deltas
        # FedAvg: the tier mean itself where nothing was mixed (exact), w + g_t where it was
        return {k: weights[k] + deltas[k] if k in mixed else mean[k] for k in keys}, deltas

    def _distil(self, tier: int, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tier ``tier``'s top-block pseudo-gradients mixed with tier ``tier`` + 1's momentum
        of the previous round, by global name; none for the deepest tier or when β = 0."""
        beta = self.cfg.inclusivefl_beta
        if tier == self.num_exits - 1 or beta == 0:
            return {}
        prefix = f"tiers.{tier}.block."
        top = {k[len(prefix):]: d for k, d in deltas.items() if k.startswith(prefix)}
        mixed = momentum_distillation(top, self._server.momentum.get(tier + 1, {}), beta)
        return {prefix + name: d for name, d in mixed.items()}

    def _momentum(self, tier: int, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m̄_t: the mean of tier ``tier``'s pseudo-gradients over blocks e_{t−1}+1..e_t (the
        blocks above tier t − 1's exit), by block-relative name."""
        low, top = self.exit_blocks[tier - 1] + 1, self.exit_blocks[tier]
        prefixes = [f"backbone.blocks.{b}." for b in range(low, top)] + [f"tiers.{tier}.block."]
        return block_mean([{k[len(p):]: d for k, d in deltas.items() if k.startswith(p)}
                           for p in prefixes])
