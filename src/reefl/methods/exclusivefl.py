"""ExclusiveFL (docs/method.md §6): only the clients that can afford the full model take part.

Each round the round's quota, max(1, round(fraction-train × all clients)), is sampled from
the clients of tier K − 1 alone (all of them if fewer; ``takes_part`` says which tiers may
be sampled, ``federation.strategy.round_participants`` draws), as the official code's
``BudgetClientManager`` (the sample size from all clients, drawn from those whose budget
reaches the last exit). A run config whose tier rule gives no client tier K − 1 is rejected
(every round would be skipped; ``check_config``). The sampled clients train the full
backbone and every exit's head (``PerExitHeads``) on Σ CE, without distillation; the server
takes the per-parameter example-weighted mean (FedAvg).
"""

from __future__ import annotations

import torch

from reefl.config import ConfigError, RunConfig
from reefl.federation.tiers import tier_of
from reefl.methods.base import HeldOutCE, Method
from reefl.methods.losses import exit_cross_entropies
from reefl.models import EarlyExitModel


class ExclusiveFL(Method):
    """Full-model clients only; per-exit heads, Σ CE, FedAvg."""

    name = "exclusivefl"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Reject a tier rule that makes no client (partition ids 0..num-clients − 1) of the
        deepest tier: only those train, so every round would be skipped and the untrained
        model reported as the result."""
        deepest = cfg.num_exits - 1
        if any(tier_of(pid, cfg) == deepest for pid in range(cfg.num_clients)):
            return
        if cfg.tier_rule == "round-robin":
            raise ConfigError(f"num-clients must be >= num-exits ({cfg.num_exits}) for method "
                              f"exclusivefl under tier-rule round-robin (it trains only tier "
                              f"{deepest}), or set maximum = true; got '{cfg.num_clients}'")
        raise ConfigError(f"tier-ratios must give tier {deepest} at least one of the "
                          f"{cfg.num_clients} clients (num-clients) for method exclusivefl (it "
                          f"trains only that tier), or set maximum = true; "
                          f"got '{cfg.tier_ratios}'")

    def build_architecture(self, tier: int) -> EarlyExitModel:
        return self.build_heads_model(tier)

    def takes_part(self, tier: int) -> bool:
        """Only the deepest tier (clients that afford every block) may be sampled: the
        round's quota is drawn from its clients alone."""
        return tier == self.num_exits - 1

    def new_loss_state(self, held_out: HeldOutCE | None = None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k over every exit."""
        ces = exit_cross_entropies(logits, labels)
        return torch.stack(ces).sum(), [ce.item() for ce in ces]
