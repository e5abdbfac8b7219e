"""ReeFL (Lee et al., ICML 2024): one shared Ree exit module, self-distillation from the
client's own best exit chosen on the fly (METHOD §2–3)."""

from __future__ import annotations

import torch

from reefl.methods.base import Method
from reefl.methods.losses import (
    TeacherTracker,
    distill_all_pairs,
    distill_from,
    exit_cross_entropies,
    kd_weight,
)
from reefl.models import EarlyExitModel, Ree, VisionTransformer


class ReeFL(Method):
    """Backbone cut at the tier's exit, followed after every block by the shared Ree."""

    name = "reefl"

    def build_model(self, tier: int) -> EarlyExitModel:
        cfg, bb = self.cfg, self.cfg.backbone
        exit_blocks = self.exit_blocks[: tier + 1]
        backbone = VisionTransformer(
            img_size=cfg.img_size, patch_size=bb["patch_size"], in_chans=self.task.in_chans,
            embed_dim=bb["embed_dim"], depth=exit_blocks[-1] + 1, num_heads=bb["num_heads"],
            mlp_ratio=bb["mlp_ratio"],
        )
        ree = Ree(
            bb["embed_dim"], self.task.num_classes, num_blocks=bb["depth"],
            exit_blocks=exit_blocks, num_heads=cfg.ree_heads, attn_dim=cfg.ree_attn_dim,
            mlp_ratio=cfg.ree_mlp_ratio, depth=cfg.ree_depth,
            recurrent_steps=cfg.ree_recurrent_steps, modulation=cfg.modulation,
        )
        return EarlyExitModel(backbone, ree)

    def new_loss_state(self) -> TeacherTracker:
        return TeacherTracker()

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: TeacherTracker) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k + λ(r)·(distillation chosen by the ``distillation`` setting)."""
        ces = exit_cross_entropies(logits, labels)
        values = [ce.item() for ce in ces]
        tau = self.cfg.kd_temperature
        mode = self.cfg.distillation
        if mode == "none" or len(logits) == 1:
            kd = ces[0].new_zeros(())
        elif mode == "all":
            kd = distill_all_pairs(logits, tau) / (len(logits) - 1)
        else:
            teacher = len(logits) - 1 if mode == "forward" else state.update(values)
            kd = distill_from(logits, teacher, tau)
        loss = torch.stack(ces).sum() + kd_weight(server_round, self.cfg.kd_rounds) * kd
        return loss, values
