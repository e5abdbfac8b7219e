"""A ViT/DeiT backbone that can be built cut after any block.

Parameter names follow timm's ``vision_transformer.py`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1/attn/norm2/mlp.fc1/mlp.fc2``, and with LayerScale
``blocks.{i}.ls1.gamma/ls2.gamma``) so that DeiT checkpoints load by name, except that
attention has separate ``q``, ``k`` and ``v`` maps (LoRA adapts q and v; a fused ``qkv``
checkpoint tensor is split when loaded). There is no final norm and no
classifier: every exit brings its own.

Shapes in the comments: B batch, N tokens (the class token and P patches, N = 1 + P),
D width (``embed_dim``), H heads, A attention width (``attn_dim``, A/H per head), F the MLP's
hidden width; images are (B, Cin, Himg, Wimg), cut into p × p patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """timm's default initialisation: normal(0, std) truncated at ±2 std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over heads (B, H, N, A/H).

    ``scaled_dot_product_attention`` everywhere (in fp32 its CPU kernel is the faster one),
    except under CPU bf16 autocast: there its kernel is slower than two bf16 matmuls and a
    softmax on a CPU with AVX-512 BF16 (``benchmarks/train_step.py``, bf16 vs bf16-sdpa).
    """
    if (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v  # (B, H, N, A/H)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, A/H)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v maps of width ``attn_dim``.

    The backbone uses ``attn_dim = dim`` and the usual head-size scaling; Ree uses a narrow
    ``attn_dim`` with scale ``attn_dim ** -0.5`` (docs/method.md §2), hence both are parameters.
    """

    def __init__(self, dim: int, num_heads: int, attn_dim: int | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        attn_dim = attn_dim or dim
        self.num_heads = num_heads
        self.scale = scale if scale is not None else (attn_dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, attn_dim)
        self.k = nn.Linear(dim, attn_dim)
        self.v = nn.Linear(dim, attn_dim)
        self.proj = nn.Linear(attn_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape  # (B, N, A)
        return x.view(batch, tokens, self.num_heads, -1).transpose(1, 2)  # (B, H, N, A/H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) -> q, k, v: (B, H, N, A/H) each
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        out = attention(q, k, v, self.scale)  # (B, H, N, A/H)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, A) -> (B, N, D)


class Mlp(nn.Module):
    """Two linear maps with GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, F) -> (B, N, D)


class LayerScale(nn.Module):
    """A learnt per-channel scale of a residual branch (CaiT, DINOv2): ``x * gamma``, with
    ``gamma`` initialised to ``init_value`` everywhere (timm's ``LayerScale``)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma  # (B, N, D) * (D,) -> (B, N, D)


class Block(nn.Module):
    """A pre-LN transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x)); with
    ``layer_scale`` (LayerScale's initial value) each branch is scaled first,
    x + ls1(attn(norm1(x))) and x + ls2(mlp(norm2(x))). Without it ``ls1``/``ls2`` are
    identities that hold no parameters, so names, initialisation and outputs are unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6,
                 attn_dim: int | None = None, attn_scale: float | None = None,
                 layer_scale: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_dim, attn_scale)
        self.ls1 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))  # (B, N, D)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to ``dim`` by a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, Himg/p, Wimg/p) -> (B, P, D)


class VisionTransformer(nn.Module):
    """The first ``depth`` blocks of a ViT; ``embed`` makes tokens, ``blocks`` transform them.

    A tier's sub-model is simply a VisionTransformer with fewer blocks: its parameter names
    are a prefix-subset of the full model's, and the full model is never built.

    ``attn_dim`` (q/k/v width, a multiple of ``num_heads``; default ``embed_dim``) and
    ``mlp_hidden`` (default ``int(embed_dim · mlp_ratio)``) let a width-scaled model (ScaleFL)
    be built with the same parameter names; its attention scale follows its own head size,
    ``(attn_dim / num_heads) ** -0.5``. ``layer_scale`` (default None: none) adds LayerScale
    to every block with that initial value (DINOv2; see ``Block``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, attn_dim: int | None = None,
                 mlp_hidden: int | None = None, layer_scale: float | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        hidden = mlp_hidden or int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, hidden, attn_dim=attn_dim, layer_scale=layer_scale)
            for _ in range(depth)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, Cin, Himg, Wimg) -> tokens (B, N, D) with the class token first."""
        patches = self.patch_embed(x)  # (B, Cin, Himg, Wimg) -> (B, P, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.pos_embed  # (B, N, D)
