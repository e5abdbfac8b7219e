"""ScaleFL (Ilhan et al., CVPR 2023): tiers scaled in width as well as depth (docs/method.md §6).

A tier-t client trains a backbone cut after exit t's block *and* narrowed to width w_t
(``scalefl-widths``, default 0.4, 0.55, 0.75, 1.0), with one LayerNorm + Linear head per exit
(``PerExitHeads``: no Ree, no modulation). Its loss is Σ CE plus distillation from its deepest
exit into its shallower ones; the server averages every element over the clients that updated
it; exit k is evaluated with tier k's width and depth.

Choices where the method (docs/method.md) is silent, or departs from the rest of the project:

* **Exit blocks and widths as ScaleFL ran them** (docs/method.md §6): with K = 4 exits of a
  12-block backbone the exits sit after blocks 3, 5, 8, 11 (not §1's 2, 5, 8, 11) and the
  widths are 0.4, 0.55, 0.75, 1.0; with K = 12 every block is an exit and the widths are
  .25 .3 .35 .4 .48 .55 .61 .69 .75 .84 .92 1. ``exit-blocks`` and ``scalefl-widths``
  replace them; for any other K or depth the exits follow §1's rule and the widths must be
  given. So a comparison with the other methods at their default exits is not exit-for-exit
  like for like at K = 4: pass the same ``exit-blocks`` to every method for that.
* **What "the first ⌊w·d⌋ channels of every tensor" means per tensor** (d the embedding
  width, H the head count, D = int(d · mlp-ratio) the MLP hidden width; see ``tier_width``):
  embedding width d_t = ⌊w·d⌋; attention width a_t = ⌊w·d⌋ rounded *up* to a multiple of H
  (never above d, which is a multiple of H); MLP hidden int(d_t · mlp-ratio), i.e. ScaleFL's
  int(int(w·d)·4) for DeiT (the official code scales the embedding first, then multiplies).
  So ``patch_embed.proj`` keeps its first d_t output filters (input channels and kernel are
  not scaled), ``cls_token`` and ``pos_embed`` their first d_t channels (every token is
  kept), ``norm1``/``norm2`` and the heads' norms d_t, ``q``/``k``/``v`` weights [a_t, d_t]
  and biases [a_t], ``proj`` [d_t, a_t] and bias [d_t], ``fc1`` [h_t, d_t], ``fc2`` [d_t,
  h_t] (h_t the MLP hidden width), head ``fc`` [C, d_t] (classes are never scaled). Every
  tensor is the leading block ``global[:s0, :s1, ...]`` of the global one (``slice_to``): the
  narrow model's heads are H contiguous chunks of the first a_t q/k/v channels, so they need
  not coincide with sub-sets of the wide model's heads.
* **Fine-tuning regimes** (``regime``): the parameters a regime adds are sliced by the same
  rule, and the rank of LoRA and the bottleneck of the adapters are not scaled: a tier gets
  LoRA A [r, d_t] and B [a_t, r] on q and v (B [a_t, r] for v as well), adapter down
  [m, d_t] and up [d_t, m], and SSF vectors of the channels they scale. A pretrained
  checkpoint is loaded into the full-width global model, so a tier's frozen weights are the
  leading block of the checkpoint's, as in ``models.checkpoints.fit_to(allow_narrower=True)``.
* **Attention scale** follows the narrow model's own head size, (a_t / H)^−0.5, as a model
  of that width would be built and trained on its own.
* **Aggregation weights.** docs/method.md §6 says ScaleFL "averages each element over the
  clients that updated it (count-based)", in contrast with §4's example-weighted average; we read
  "count-based" as each client counting once (HeteroFL's element-wise ``count``, on which
  ScaleFL's slicing builds), not weighted by its number of examples.
* **Distillation** has a constant weight (``scalefl-kd-weight``, 0.05) and its own temperature
  (``scalefl-kd-temperature``, 3.0): the method gives ScaleFL no λ(r) ramp, and ReeFL's
  ``kd-temperature`` defaults to 1, so it cannot be shared.
* Floors are taken as ⌊w·n + 1e-9⌋ so that float error (0.29·100 = 28.999…) does not drop a
  channel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from reefl.config import ConfigError, RunConfig, Setting
from reefl.methods.aggregate import sliced_mean
from reefl.methods.base import ClientUpdate, HeldOutCE, Method, TaskSpec
from reefl.methods.losses import distill_from, exit_cross_entropies
from reefl.models import EarlyExitModel, PerExitHeads, TierExits

PAPER_WIDTHS: dict[int, tuple[float, ...]] = {
    4: (0.4, 0.55, 0.75, 1.0),
    12: (0.25, 0.3, 0.35, 0.4, 0.48, 0.55, 0.61, 0.69, 0.75, 0.84, 0.92, 1.0),
}
PAPER_EXIT_BLOCKS: dict[tuple[int, int], tuple[int, ...]] = {(12, 4): (3, 5, 8, 11)}
"""ScaleFL's exits by (depth, K) where they differ from docs/method.md §1's rule."""


@dataclass(frozen=True)
class TierWidth:
    """Channel counts of a width-scaled backbone (``VisionTransformer`` keyword names)."""

    embed_dim: int
    attn_dim: int
    mlp_hidden: int


def scaled_channels(width: float, channels: int) -> int:
    """⌊width · channels⌋, immune to float error just below an integer."""
    return math.floor(width * channels + 1e-9)


def scaled_width(width: float, embed_dim: int, num_heads: int, mlp_ratio: float
                 ) -> TierWidth:
    """The channels a width-``width`` model keeps: ⌊w·d⌋ embedding channels, attention width
    ⌊w·d⌋ rounded up to a multiple of ``num_heads``, int(⌊w·d⌋ · mlp_ratio) MLP hidden units
    (the MLP follows the narrowed embedding, as in ScaleFL's code)."""
    embed = scaled_channels(width, embed_dim)
    return TierWidth(embed_dim=embed, attn_dim=num_heads * math.ceil(embed / num_heads),
                     mlp_hidden=int(embed * mlp_ratio))


def tier_widths(cfg: RunConfig) -> list[float]:
    """ScaleFL's width of every tier, shallowest first: ``scalefl-widths``, or the paper's
    list for K = 4 or 12; ConfigError if neither applies or the list is malformed."""
    allowed = (f"{cfg.num_exits} comma-separated, non-decreasing numbers in (0, 1] "
               "ending with 1.0, each leaving at least one channel")
    if not cfg.scalefl_widths.strip():
        if cfg.num_exits not in PAPER_WIDTHS:
            raise ConfigError(f"scalefl-widths must be given for num-exits={cfg.num_exits} "
                              f"(the paper's widths exist for 4 and 12 exits): {allowed}; "
                              f"got ''")
        return list(PAPER_WIDTHS[cfg.num_exits])
    try:
        widths = [float(w) for w in cfg.scalefl_widths.split(",")]
    except ValueError:
        raise ConfigError(f"scalefl-widths must be {allowed}; got '{cfg.scalefl_widths}'"
                          ) from None
    bb = cfg.backbone
    narrowest = scaled_channels(widths[0], bb["embed_dim"]) if widths else 0
    ok = (len(widths) == cfg.num_exits and all(0 < w <= 1 for w in widths)
          and all(a <= b for a, b in zip(widths, widths[1:], strict=False))
          and widths[-1] == 1.0 and narrowest >= 1 and int(narrowest * bb["mlp_ratio"]) >= 1)
    if not ok:
        raise ConfigError(f"scalefl-widths must be {allowed}; got '{cfg.scalefl_widths}'")
    return widths


class ScaleFL(Method):
    """Width- and depth-scaled tiers with per-exit heads, element-wise count-based averaging."""

    name = "scalefl"
    private_aggregate = True  # merge noises per element when DP is on
    settings = (
        Setting("scalefl-widths", ""),
        Setting("scalefl-kd-weight", 0.05, "a number >= 0", lambda v: v >= 0),
        Setting("scalefl-kd-temperature", 3.0, "a number > 0", lambda v: v > 0),
    )

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        tier_widths(cfg)

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        super().__init__(cfg, task)
        self.widths = tier_widths(cfg)

    def default_exit_blocks(self) -> list[int]:
        """ScaleFL's own exits where they differ from §1's rule (3, 5, 8, 11 for K = 4 of 12
        blocks), else the rule."""
        key = (self.cfg.backbone["depth"], self.cfg.num_exits)
        return list(PAPER_EXIT_BLOCKS.get(key, super().default_exit_blocks()))

    def tier_width(self, tier: int) -> TierWidth:
        """Channel counts of ``tier``'s backbone."""
        bb = self.cfg.backbone
        return scaled_width(self.widths[tier], bb["embed_dim"], bb["num_heads"],
                            bb["mlp_ratio"])

    def build_architecture(self, tier: int) -> EarlyExitModel:
        """Blocks 0..e_t at tier t's width, one head per exit 0..t."""
        dims = self.tier_width(tier)
        heads = PerExitHeads(dims.embed_dim, self.task.num_classes, self.exit_blocks[: tier + 1],
                             self.cfg.exit_standardise)
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

    def merge(self, global_state: dict[str, torch.Tensor],
              updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Each element: the mean over the clients whose slice covers it, one count per
        client (see the module docstring); uncovered elements keep their value. With DP
        on, the mean of the clipped updates plus noise of std z·C/n per element, n the
        clients covering it (``privacy``, docs/privacy.md)."""
        if self.privacy.on:
            return self.privacy.mean(global_state, [u.state for u in updates])
        return sliced_mean(global_state, [(u.state, 1.0) for u in updates])
