"""The interface every federated method implements (ReeFL and the baselines).

A method says: how to build the model a tier trains, which parameters that tier trains and
sends, the local loss given the exits' logits, and how the server merges the replies. The
federation and training code only talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from reefl.config import RunConfig
from reefl.federation.aggregate import weighted_mean_per_key
from reefl.models import EarlyExitModel


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

    def build_global_model(self) -> EarlyExitModel:
        """The model the server holds and evaluates: the deepest tier's."""
        return self.build_model(self.num_exits - 1)

    def trainable_keys(self, tier: int) -> list[str]:
        """Names of the parameters a tier trains, receives and sends back."""
        if tier not in self._trainable_keys:
            with torch.device("meta"):
                model = self.build_model(tier)
            self._trainable_keys[tier] = [
                name for name, p in model.named_parameters() if p.requires_grad]
        return self._trainable_keys[tier]

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
    def new_loss_state(self) -> object:
        """Per-round state of the local loss (e.g. the dynamic teacher's averages)."""

    @abstractmethod
    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """The training loss of one batch and each exit's CE (for logging)."""

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Server update: per-parameter example-weighted mean over the clients holding it."""
        return weighted_mean_per_key(
            global_state, [(u.state, u.num_examples) for u in updates]
        )
