"""ScaleFL (Ilhan et al., CVPR 2023): tiers scaled in width as well as depth (METHOD §6).

A tier-t client trains a backbone cut after exit t's block *and* narrowed to width w_t
(``scalefl-widths``, default 0.4, 0.55, 0.75, 1.0), with one LayerNorm + Linear head per exit
(``PerExitHeads``: no Ree, no modulation). Its loss is Σ CE plus distillation from its deepest
exit into its shallower ones; the server averages every element over the clients that updated
it; exit k is evaluated with tier k's width and depth.

Choices where METHOD.md is silent, or departs from the rest of the project:

* **Exit blocks.** ScaleFL's paper puts its K = 4 exits of a 12-block ViT after blocks
  3, 5, 8, 11; METHOD §1's rule gives 2, 5, 8, 11. ScaleFL uses the run's ``exit-blocks`` like
  every other method (the §1 rule unless the key is given), so that by default all methods
  exit at the same blocks and a comparison is like for like. To reproduce the paper's
  ScaleFL set-up on DeiT, pass ``exit-blocks="3,5,8,11"`` (to every method you compare).
* **What "the first ⌊w·d⌋ channels of every tensor" means per tensor** (d the embedding
  width, H the head count, D = int(d · mlp-ratio) the MLP hidden width; see ``tier_width``):
  embedding width d_t = ⌊w·d⌋; attention width a_t = ⌊w·d⌋ rounded *up* to a multiple of H
  (never above d, which is a multiple of H); MLP hidden ⌊w·D⌋. So ``patch_embed.proj`` keeps
  its first d_t output filters (input channels and kernel are not scaled), ``cls_token`` and
  ``pos_embed`` their first d_t channels (every token is kept), ``norm1``/``norm2`` and the
  heads' norms d_t, ``q``/``k``/``v`` weights [a_t, d_t] and biases [a_t], ``proj`` [d_t, a_t]
  and bias [d_t], ``fc1`` [⌊w·D⌋, d_t], ``fc2`` [d_t, ⌊w·D⌋], head ``fc`` [C, d_t] (classes
  are never scaled). Every tensor is the leading block ``global[:s0, :s1, ...]`` of the global
  one (``slice_to``): the narrow model's heads are H contiguous chunks of the first a_t
  q/k/v channels, so they need not coincide with sub-sets of the wide model's heads.
* **Fine-tuning regimes** (``regime``): the parameters a regime adds are sliced by the same
  rule, and the rank of LoRA and the bottleneck of the adapters are not scaled: a tier gets
  LoRA A [r, d_t] and B [a_t, r] on q and v (B [a_t, r] for v as well), adapter down
  [m, d_t] and up [d_t, m], and SSF vectors of the channels they scale. A pretrained
  checkpoint is loaded into the full-width global model, so a tier's frozen weights are the
  leading block of the checkpoint's, as in ``models.pretrained.fit_to(allow_narrower=True)``.
* **Attention scale** follows the narrow model's own head size, (a_t / H)^−0.5, as a model
  of that width would be built and trained on its own.
* **Aggregation weights.** METHOD §6 says ScaleFL "averages each element over the clients that
  updated it (count-based)", in contrast with §4's example-weighted average; we read
  "count-based" as each client counting once (HeteroFL's element-wise ``count``, on which
  ScaleFL's slicing builds), not weighted by its number of examples.
* **Distillation** has a constant weight (``scalefl-kd-weight``, 0.05) and its own temperature
  (``scalefl-kd-temperature``, 3.0): METHOD gives ScaleFL no λ(r) ramp, and ReeFL's
  ``kd-temperature`` defaults to 1, so it cannot be shared.
* Floors are taken as ⌊w·n + 1e-9⌋ so that float error (0.29·100 = 28.999…) does not drop a
  channel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from reefl.config import RunConfig
from reefl.federation.aggregate import sliced_mean
from reefl.methods.base import ClientUpdate, HeldOutCE, Method, TaskSpec
from reefl.methods.losses import distill_from, exit_cross_entropies
from reefl.models import EarlyExitModel, PerExitHeads, TierExits


@dataclass(frozen=True)
class TierWidth:
    """Channel counts of a width-scaled backbone (``VisionTransformer`` keyword names)."""

    embed_dim: int
    attn_dim: int
    mlp_hidden: int


def scaled_channels(width: float, channels: int) -> int:
    """⌊width · channels⌋, immune to float error just below an integer."""
    return math.floor(width * channels + 1e-9)


def scaled_width(width: float, embed_dim: int, num_heads: int, mlp_hidden: int) -> TierWidth:
    """The channels a width-``width`` model keeps: ⌊w·d⌋ embedding channels, attention width
    ⌊w·d⌋ rounded up to a multiple of ``num_heads``, ⌊w·D⌋ MLP hidden units."""
    embed = scaled_channels(width, embed_dim)
    return TierWidth(embed_dim=embed, attn_dim=num_heads * math.ceil(embed / num_heads),
                     mlp_hidden=scaled_channels(width, mlp_hidden))


class ScaleFL(Method):
    """Width- and depth-scaled tiers with per-exit heads, element-wise count-based averaging."""

    name = "scalefl"

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        super().__init__(cfg, task)
        self.widths = cfg.scalefl_width_list

    def tier_width(self, tier: int) -> TierWidth:
        """Channel counts of ``tier``'s backbone."""
        bb = self.cfg.backbone
        return scaled_width(self.widths[tier], bb["embed_dim"], bb["num_heads"],
                            int(bb["embed_dim"] * bb["mlp_ratio"]))

    def build_architecture(self, tier: int) -> EarlyExitModel:
        """Blocks 0..e_t at tier t's width, one head per exit 0..t."""
        dims = self.tier_width(tier)
        heads = PerExitHeads(dims.embed_dim, self.task.num_classes, self.exit_blocks[: tier + 1])
        return EarlyExitModel(self.build_backbone(tier, **asdict(dims)), heads)

    def exit_evaluator(self, global_state: dict[str, torch.Tensor]) -> nn.Module:
        """Exit k read from tier k's own model (its width and depth), built from the global
        weights without a random initialisation."""
        models = []
        for tier in range(self.num_exits):
            with torch.device("meta"):
                model = self.build_model(tier)
            model.load_state_dict(self.tier_state(global_state, tier), strict=True, assign=True)
            models.append(model)
        return TierExits(models)

    def new_loss_state(self, held_out: HeldOutCE | None = None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k + β·Σ_{k<t} τ²·KL(p_t.detach() ‖ p_k): the client's deepest exit t
        teaches its shallower ones (β = scalefl-kd-weight, τ = scalefl-kd-temperature)."""
        ces = exit_cross_entropies(logits, labels)
        kd = distill_from(logits, len(logits) - 1, self.cfg.scalefl_kd_temperature)
        loss = torch.stack(ces).sum() + self.cfg.scalefl_kd_weight * kd
        return loss, [ce.item() for ce in ces]

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Each element: the mean over the clients whose slice covers it, one count per
        client (see the module docstring); uncovered elements keep their value."""
        return sliced_mean(global_state, [(u.state, 1.0) for u in updates])
