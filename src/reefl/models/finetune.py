"""Fine-tuning regimes (docs/method.md §5): which parameters of a model train, and the small modules
that LoRA, adapters and SSF add to the backbone.

``apply_regime(model, regime)`` turns a freshly built model (any mix of ``VisionTransformer``
parts and exit modules) into its regime's form, in place:

* ``full``: nothing added, every parameter trains;
* ``frozen``: nothing added, only the exit modules train (the paper's default);
* ``lora``: on every backbone block's ``attn.q`` and ``attn.v``, y = W x + b + (α/r)·B A x
  with A [r, in] (Kaiming-uniform, as PEFT) and B [out, r] (zeros);
* ``sa`` (sequential adapter): after the attention and after the MLP of every block, the
  sub-layer's output o becomes o + up(ReLU(down(o))), d → ``adapter-dim`` → d;
* ``pa`` (parallel adapter): beside them, o becomes o + up(ReLU(down(x))), where x is the
  sub-layer's own input (the normed tokens);
* ``ssf`` (scale and shift): y ↦ γ ⊙ y + β after the patch embedding, q, k, v, the attention
  projection, both MLP linears, both block norms, and every exit head's norm.

Initialisation (docs/method.md §5, as the official code): both adapter Linears like every Linear of
the ViT (vit.py's ``trunc_normal_``, std 0.02 truncated at ±2 std, and zero bias; down's
weight drawn before up's), so the up-projection is not zero; SSF's γ ~ N(1, 0.02) and then
β ~ N(0, 0.02), plain (untruncated) normals (the official ``init_ssf_scale_shift``:
``nn.init.normal_(scale, mean=1, std=.02)``, ``nn.init.normal_(shift, std=.02)``); LoRA's A
Kaiming-uniform and B zero. All are drawn from torch's global generator as the model is
built, so ``Method.initial_state``, which builds under the run's seed, gives every process
the same values.

Besides the exit modules, only the parameters a regime adds train; the backbone's own
parameters are frozen in every regime but ``full``.

**One mechanism.** A regime attaches its parameters to an existing module (``lora_a`` and
``lora_b`` on the linear map; an ``adapter`` child on ``attn`` or ``mlp``; ``ssf_scale`` and
``ssf_shift`` on the module whose output they transform) and registers a forward hook on that
module which reads them. The backbone's own parameter names never change, so pretrained
checkpoints, the server's global state, the trainable/frozen split and ScaleFL's slicing all
use vit.py's names, and a regime's parameters are named after the module they adapt (e.g.
``backbone.blocks.3.attn.q.lora_b``). The hooks read the parameters from the module they are
called with, so ``copy.deepcopy`` of an adapted module adapts the copy with its own weights.

**What counts as the exit modules**: every module with an ``after_block`` method (``Ree``,
``PerExitHeads``, the ``ExitModule`` protocol of the exit loop); Ree's own transformer layers
are ``Block`` instances too, but they are part of the exit module and never adapted.

Choices where the method (docs/method.md) is silent:

* **Only LoRA starts as the model it adapts** (B is zero): a pretrained backbone's
  features are exactly preserved in round 1 under LoRA, but not under SA/PA (a small random
  residual, its up-projection drawn like any ViT Linear) or SSF (γ, β random around 1, 0),
  as in the official code.
* The adapters have no LayerNorm of their own and scale 1 (the official configs'
  ``adapter_layernorm_option: null``, ``adapter_scalar`` 1.0) and no dropout.
* The truncation is vit.py's, the same as for the backbone's Linears: the official code's
  ``trunc_normal_`` cuts at ±2 absolute (±100 std at std 0.02, in effect untruncated).
* SSF on a norm acts after the norm's own affine map; on the exit heads' norms (which train in
  every regime) it is a re-parametrisation and adds no expressive power, kept to follow §5.
* **Why not PEFT for LoRA**: PEFT renames the adapted layer's weights (``q.weight`` becomes
  ``q.base_layer.weight``), which would break the checkpoint names every other part of the
  project uses; it pulls in transformers and accelerate (174 MB installed here) and adds about
  5 s to the import of every Flower process; and it has no sequential/parallel adapter or SSF,
  so LoRA would be the only regime built differently. The LoRA here is a few lines on the same
  mechanism as the other regimes; ``benchmarks/lora_vs_peft.py`` checks it against PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reefl.config import REGIMES
from reefl.models.heads import ExitHead
from reefl.models.vit import Block, PatchEmbed, trunc_normal_


@dataclass(frozen=True)
class Regime:
    """A fine-tuning regime and its sizes (run-config ``regime``, ``lora-rank``,
    ``lora-alpha``, ``adapter-dim``)."""

    name: str
    lora_rank: int
    lora_alpha: float
    adapter_dim: int


# -- the added modules and their hooks ------------------------------------------------------
class Adapter(nn.Module):
    """Bottleneck d → ``hidden`` → d with ReLU; both Linears initialised like the ViT's
    (truncated normal std 0.02, zero bias: down's weight drawn first, then up's)."""

    def __init__(self, dim: int, hidden: int, sequential: bool) -> None:
        super().__init__()
        self.sequential = sequential
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.up = nn.Linear(hidden, dim)
        for linear in (self.down, self.up):
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def _lora_hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor
               ) -> torch.Tensor:
    """W x + b  →  W x + b + (α/r)·B A x."""
    low_rank = F.linear(F.linear(inputs[0], module.lora_a), module.lora_b)
    return output + module.lora_scaling * low_rank


def _adapter_hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor
                  ) -> torch.Tensor:
    """o → o + adapter(o) (sequential) or o + adapter(x) (parallel, x the sub-layer input)."""
    adapter = module.adapter
    return output + adapter(output if adapter.sequential else inputs[0])


def _ssf_hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor
              ) -> torch.Tensor:
    """y → γ ⊙ y + β over the last (channel) dimension."""
    return output * module.ssf_scale + module.ssf_shift


def add_lora(linear: nn.Linear, rank: int, alpha: float) -> None:
    """LoRA on ``linear``: ``lora_a`` [rank, in] Kaiming-uniform, ``lora_b`` [out, rank] zero."""
    linear.lora_a = nn.Parameter(torch.empty(rank, linear.in_features))
    linear.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))
    nn.init.kaiming_uniform_(linear.lora_a, a=math.sqrt(5))
    linear.lora_scaling = alpha / rank
    linear.register_forward_hook(_lora_hook)


def add_adapter(sublayer: nn.Module, dim: int, hidden: int, sequential: bool) -> None:
    """An ``adapter`` beside (parallel) or after (sequential) ``sublayer`` (attn or mlp)."""
    sublayer.adapter = Adapter(dim, hidden, sequential)
    sublayer.register_forward_hook(_adapter_hook)


def add_scale_shift(module: nn.Module, channels: int) -> None:
    """SSF after ``module``: ``ssf_scale`` ~ N(1, 0.02), then ``ssf_shift`` ~ N(0, 0.02), of
    ``channels`` (plain normals, as the official code)."""
    module.ssf_scale = nn.Parameter(torch.empty(channels))
    module.ssf_shift = nn.Parameter(torch.empty(channels))
    nn.init.normal_(module.ssf_scale, mean=1.0, std=0.02)
    nn.init.normal_(module.ssf_shift, mean=0.0, std=0.02)
    module.register_forward_hook(_ssf_hook)


# -- applying a regime -------------------------------------------------------------------------
def is_exit_module(module: nn.Module) -> bool:
    """Exit modules (Ree, per-exit heads) are the modules the exit loop calls after blocks."""
    return callable(getattr(module, "after_block", None))


def _adapt_block(block: Block, regime: Regime) -> None:
    attn, mlp = block.attn, block.mlp
    if regime.name == "lora":
        add_lora(attn.q, regime.lora_rank, regime.lora_alpha)
        add_lora(attn.v, regime.lora_rank, regime.lora_alpha)
    elif regime.name in ("sa", "pa"):
        dim = block.norm1.normalized_shape[0]
        for sublayer in (attn, mlp):
            add_adapter(sublayer, dim, regime.adapter_dim, sequential=regime.name == "sa")
    elif regime.name == "ssf":
        for linear in (attn.q, attn.k, attn.v, attn.proj, mlp.fc1, mlp.fc2):
            add_scale_shift(linear, linear.out_features)
        for norm in (block.norm1, block.norm2):
            add_scale_shift(norm, norm.normalized_shape[0])


def _adapt(module: nn.Module, regime: Regime) -> None:
    """Add the regime's modules below ``module``: backbone blocks and patch embedding, and
    (SSF) the heads of exit modules."""
    for child in module.children():
        if is_exit_module(child):
            if regime.name == "ssf":
                for head in child.modules():
                    if isinstance(head, ExitHead):
                        add_scale_shift(head.norm, head.norm.normalized_shape[0])
        elif isinstance(child, Block):
            _adapt_block(child, regime)
        elif isinstance(child, PatchEmbed):
            if regime.name == "ssf":
                add_scale_shift(child, child.proj.out_channels)
        else:
            _adapt(child, regime)


def _exit_modules(module: nn.Module) -> list[nn.Module]:
    if is_exit_module(module):
        return [module]
    return [found for child in module.children() for found in _exit_modules(child)]


def apply_regime(model: nn.Module, regime: Regime) -> nn.Module:
    """Adapt ``model`` in place for ``regime`` and set which parameters train; returns it.

    Must be applied once, to a model as built (the hooks would stack otherwise).
    """
    if regime.name not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}; got '{regime.name}'")
    if regime.name == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    for exits in _exit_modules(model):
        exits.requires_grad_(True)
    _adapt(model, regime)  # the parameters it adds are new, hence trainable
    return model


# -- folding a regime into the plain architecture -----------------------------------------
FOLDABLE = ("lora", "ssf")


def merge_regime(state: dict[str, torch.Tensor], regime: Regime
                 ) -> tuple[dict[str, torch.Tensor], str]:
    """A model state of ``regime`` folded, where the regime is linear, into the weights of
    the plain architecture: returns the new state and the regime its model has.

    * LoRA on a Linear ``m``: W ← W + (α/r)·B A; ``m.lora_a``/``m.lora_b`` go.
    * SSF after a Linear, a LayerNorm or the patch embedding ``m``: y ↦ γ ⊙ y + β of
      y = W x + b is W ← diag(γ) W, b ← γ ⊙ b + β (the patch embedding's convolution per
      output channel); ``m.ssf_scale``/``m.ssf_shift`` go.
    * Adapters (``sa``, ``pa``) have a ReLU and do not fold: the state is returned as is.

    The folded model is ``full`` (every parameter its own; nothing added) and computes the
    same function up to float rounding.
    """
    if regime.name not in FOLDABLE:
        return dict(state), regime.name
    merged = {k: v.detach().clone() for k, v in state.items()}
    for name in [k for k in state if k.endswith(".lora_a")]:
        module = name.removesuffix(".lora_a")
        a, b = merged.pop(name), merged.pop(f"{module}.lora_b")
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = weight + (regime.lora_alpha / regime.lora_rank) * (b @ a)
    for name in [k for k in state if k.endswith(".ssf_scale")]:
        module = name.removesuffix(".ssf_scale")
        scale, shift = merged.pop(name), merged.pop(f"{module}.ssf_shift")
        target = f"{module}.proj" if f"{module}.proj.weight" in merged else module
        weight = merged[f"{target}.weight"]
        merged[f"{target}.weight"] = weight * scale.view(-1, *[1] * (weight.dim() - 1))
        merged[f"{target}.bias"] = merged[f"{target}.bias"] * scale + shift
    return merged, "full"
