"""The interface every federated method implements (ReeFL and the baselines).

A method says: how to build the model a tier trains, which parameters that tier trains and
sends, the local loss given the exits' logits, and how the server merges the replies. Optional
hooks (no-ops by default) let a method drop tiers from a round (``takes_part``), ask for a
held-out split of each client's data (``held_out_fraction``), add a term to the local loss and
keep per-client state across rounds (``local_penalty``, ``finish_local``). The federation and
training code only talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from reefl.config import RunConfig
from reefl.federation.aggregate import weighted_mean_per_key
from reefl.models import EarlyExitModel, PerExitHeads, VisionTransformer

HeldOutCE = Callable[[], list[float]]
"""Per-exit CE of the model being trained on the next batch of the client's held-out data."""


@dataclass(frozen=True)
class TaskSpec:
    """What the data fixes about the model: classes and input channels."""

    num_classes: int
    in_chans: int


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its trained parameters, its number of training examples, and the
    training metrics it reported."""

    partition_id: int
    tier: int
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """A federated early-exit method; one instance per process, built from the run config."""

    held_out_fraction: float = 0.0
    """Share of each client's training data split off (seeded, the same every round) and not
    trained on; when > 0, ``new_loss_state`` receives the CE on it (``held_out``)."""

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        self.cfg = cfg
        self.task = task
        self.exit_blocks = cfg.exit_block_list
        self._trainable_keys: dict[int, list[str]] = {}

    @property
    def num_exits(self) -> int:
        return len(self.exit_blocks)

    @abstractmethod
    def build_model(self, tier: int) -> EarlyExitModel:
        """The sub-model of ``tier``: blocks up to exit ``tier``'s block, exits 0..tier."""

    def build_backbone(self, tier: int, **widths: int) -> VisionTransformer:
        """The backbone cut after the block of exit ``tier``: full width, unless ``widths``
        sets ``embed_dim``, ``attn_dim`` or ``mlp_hidden`` (ScaleFL's narrower tiers)."""
        cfg, bb = self.cfg, self.cfg.backbone
        return VisionTransformer(**{
            "img_size": cfg.img_size, "patch_size": bb["patch_size"],
            "in_chans": self.task.in_chans, "embed_dim": bb["embed_dim"],
            "depth": self.exit_blocks[tier] + 1, "num_heads": bb["num_heads"],
            "mlp_ratio": bb["mlp_ratio"], **widths,
        })

    def build_heads_model(self, tier: int) -> EarlyExitModel:
        """The baselines' sub-model (METHOD §6): the backbone cut at exit ``tier`` and one
        LayerNorm + Linear head per exit 0..tier."""
        heads = PerExitHeads(self.cfg.backbone["embed_dim"], self.task.num_classes,
                             self.exit_blocks[: tier + 1])
        return EarlyExitModel(self.build_backbone(tier), heads)

    def build_global_model(self) -> nn.Module:
        """The model the server holds and evaluates: by default the deepest tier's (a method
        whose tiers keep parameters apart, like InclusiveFL, holds a module of its own)."""
        return self.build_model(self.num_exits - 1)

    def trainable_keys(self, tier: int) -> list[str]:
        """Names of the parameters a tier trains, receives and sends back."""
        if tier not in self._trainable_keys:
            with torch.device("meta"):
                model = self.build_model(tier)
            self._trainable_keys[tier] = [
                name for name, p in model.named_parameters() if p.requires_grad]
        return self._trainable_keys[tier]

    def exit_ids(self, tier: int) -> list[int]:
        """The global index of every exit the tier's model returns, in order (names its
        training metrics): exits 0..tier by default."""
        return list(range(tier + 1))

    def takes_part(self, tier: int) -> bool:
        """Whether a sampled client of ``tier`` trains this round. The strategy applies it
        after the seeded sampling, so every method draws the same partition ids."""
        return True

    def client_payload(self, global_state: dict[str, torch.Tensor], tier: int
                       ) -> dict[str, torch.Tensor]:
        """What the server sends a client of ``tier``, named as in that tier's model; the
        client returns the same names and shapes. By default: the tier's trainable
        parameters, taken as they are from the global model."""
        return {k: global_state[k] for k in self.trainable_keys(tier)}

    def exit_evaluator(self, global_state: dict[str, torch.Tensor]) -> nn.Module:
        """A module whose forward returns the logits of every exit of the global model. By
        default the global model itself: depth is causal, so one pass serves every exit."""
        model = self.build_global_model()
        model.load_state_dict(global_state)
        return model

    @abstractmethod
    def new_loss_state(self, held_out: HeldOutCE | None = None) -> object:
        """Per-round state of the local loss (e.g. the dynamic teacher's averages).
        ``held_out`` is None unless the method's ``held_out_fraction`` is > 0."""

    @abstractmethod
    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """The training loss of one batch and each exit's CE (for logging)."""

    def local_penalty(self, params: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                      client_state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to every batch's training loss, from the trainable parameters (by
        name), the values the server sent, and this client's state; None adds nothing."""
        return None

    def finish_local(self, params: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                     client_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Entries of this client's state to set after local training (the ClientApp keeps
        the state per client across rounds, in Flower's ``context.state``). By default none."""
        return {}

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Server update: per-parameter example-weighted mean over the clients holding it."""
        return weighted_mean_per_key(
            global_state, [(u.state, u.num_examples) for u in updates]
        )
