"""ExclusiveFL (METHOD §6): only the clients that can afford the full model take part.

Each round the server draws the same seeded sample as every other method and then drops the
clients below tier K − 1 (``takes_part``); a round where none remain is skipped. The
remaining clients train the full backbone and every exit's head (``PerExitHeads``) on Σ CE,
without distillation; the server takes the per-parameter example-weighted mean (FedAvg).
"""

from __future__ import annotations

import torch

from reefl.methods.base import HeldOutCE, Method
from reefl.methods.losses import exit_cross_entropies
from reefl.models import EarlyExitModel


class ExclusiveFL(Method):
    """Full-model clients only; per-exit heads, Σ CE, FedAvg."""

    name = "exclusivefl"

    def build_architecture(self, tier: int) -> EarlyExitModel:
        return self.build_heads_model(tier)

    def takes_part(self, tier: int) -> bool:
        """Only the deepest tier (clients that afford every block) trains."""
        return tier == self.num_exits - 1

    def new_loss_state(self, held_out: HeldOutCE | None = None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k over every exit."""
        ces = exit_cross_entropies(logits, labels)
        return torch.stack(ces).sum(), [ce.item() for ce in ces]
