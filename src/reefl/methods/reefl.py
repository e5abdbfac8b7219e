"""ReeFL (Lee et al., ICML 2024): one shared Ree exit module, self-distillation from the
client's own best exit chosen on the fly (docs/method.md §2–3).

Ablations (run-config switches): ``exit-module = "heads"`` replaces the shared Ree by one
LayerNorm + Linear head per exit (``modulation`` then has nothing to act on);
``distillation`` picks the teacher: ``dynamic_ma`` (default, EMA of the training CE),
``dynamic`` (lowest CE on a held-out batch), ``forward`` (deepest exit), ``all`` (mutual,
divided by exits − 1) or ``none``.

``dynamic``: 20% of each client's training data (``HELD_OUT_FRACTION``) is split off once,
seeded by (seed, partition id), so the same examples are held out in every round and never
trained on; the client reports only the examples it trained on. At every step the model, in
eval mode and without gradients, reads the next held-out batch (batch size as in training, in
a fixed order, cycling), and the exit with the lowest CE on it teaches the others.
"""

from __future__ import annotations

import torch

from reefl.config import ConfigError, RunConfig, Setting
from reefl.methods.base import HeldOutCE, Method
from reefl.methods.losses import (
    HeldOutTeacher,
    TeacherTracker,
    distill_from,
    exit_cross_entropies,
    kd_weight,
    mutual_distillation,
)
from reefl.models import EarlyExitModel, Ree

HELD_OUT_FRACTION = 0.2  # docs/method.md §3, variant dynamic
DISTILLATIONS = ("none", "forward", "all", "dynamic_ma", "dynamic")
EXIT_MODULES = ("ree", "heads")


def _at_least_one(value: int) -> bool:
    return value >= 1


def _positive(value: float) -> bool:
    """The Ree MLP's width ratio: a negative one cannot build the module, 0 leaves it none."""
    return value > 0


class ReeFL(Method):
    """Backbone cut at the tier's exit, followed after every block by the shared Ree (or, as
    an ablation, by one head per exit)."""

    name = "reefl"
    settings = (
        Setting("ree-heads", 8, "an integer >= 1", _at_least_one),
        Setting("ree-attn-dim", 16, "an integer >= 1", _at_least_one),
        Setting("ree-mlp-ratio", 1.35, "a number > 0", _positive),
        Setting("ree-depth", 1, "an integer >= 1", _at_least_one),
        Setting("ree-recurrent-steps", 1, "an integer >= 1", _at_least_one),
        Setting("ree-layer-scale", 0.01, "a number >= 0 (0: the paper's Ree, no LayerScale)",
                lambda v: v >= 0),
        Setting("modulation", True),
        Setting("exit-module", "ree", f"one of {', '.join(EXIT_MODULES)}",
                lambda v: v in EXIT_MODULES),
        Setting("distillation", "dynamic_ma", f"one of {', '.join(DISTILLATIONS)}",
                lambda v: v in DISTILLATIONS),
    )

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.ree_attn_dim % cfg.ree_heads:
            raise ConfigError(f"ree-attn-dim must be a multiple of ree-heads ({cfg.ree_heads}); "
                              f"got '{cfg.ree_attn_dim}'")

    @property
    def held_out_fraction(self) -> float:
        return HELD_OUT_FRACTION if self.cfg.distillation == "dynamic" else 0.0

    def build_architecture(self, tier: int) -> EarlyExitModel:
        if self.cfg.exit_module == "heads":
            return self.build_heads_model(tier)
        cfg, bb = self.cfg, self.cfg.backbone
        ree = Ree(
            bb["embed_dim"], self.task.num_classes, num_blocks=bb["depth"],
            exit_blocks=self.exit_blocks[: tier + 1], num_heads=cfg.ree_heads,
            attn_dim=cfg.ree_attn_dim, mlp_ratio=cfg.ree_mlp_ratio, depth=cfg.ree_depth,
            recurrent_steps=cfg.ree_recurrent_steps, modulation=cfg.modulation,
            layer_scale=cfg.ree_layer_scale or None, standardise=cfg.exit_standardise,
        )
        return EarlyExitModel(self.build_backbone(tier), ree)

    def new_loss_state(self, held_out: HeldOutCE | None = None
                       ) -> TeacherTracker | HeldOutTeacher:
        """The teacher chooser: held-out CE for ``dynamic``, the EMA tracker otherwise."""
        if self.cfg.distillation != "dynamic":
            return TeacherTracker()
        if held_out is None:
            raise ValueError("distillation 'dynamic' needs the held-out CE (held_out_fraction)")
        return HeldOutTeacher(held_out)

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor, server_round: int,
                   state: TeacherTracker | HeldOutTeacher) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k + λ(r)·(distillation chosen by the ``distillation`` setting)."""
        ces = exit_cross_entropies(logits, labels)
        values = [ce.item() for ce in ces]
        tau = self.cfg.kd_temperature
        mode = self.cfg.distillation
        if mode == "none" or len(logits) == 1:
            kd = ces[0].new_zeros(())
        elif mode == "all":
            kd = mutual_distillation(logits, tau)
        else:
            teacher = len(logits) - 1 if mode == "forward" else state.update(values)
            kd = distill_from(logits, teacher, tau)
        loss = torch.stack(ces).sum() + kd_weight(server_round, self.cfg.kd_rounds) * kd
        return loss, values
