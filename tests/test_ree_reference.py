"""ReeFL's early-exit forward pass against a reference written from ../shared/METHOD.md §1–2
with plain tensor operations on the model's weights.

The reference calls none of the model's own code (no ``Ree.transform``, ``Block``,
``Attention``, ``attention`` or ``F.scaled_dot_product_attention``, not even
``nn.LayerNorm``/``nn.GELU``): a bug inside Ree cannot pass by being compared with itself.
Weights are redrawn at scale ~1 (the trunc-normal std 0.02 initialisation leaves Ree's
attention almost uniform and its residual branches tiny, which would hide e.g. a wrong
attention scale or order of layers), and both sides run in float64, so the 1e-5 tolerance
is five orders above the rounding and far below the effect of any structural change.

A second test pins one tiny hand-set Ree to values written down by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.models import Ree

TASK = TaskSpec(num_classes=5, in_chans=1)
BACKBONE = {"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 4, "num-heads": 2,
            "mlp-ratio": 2.0}
EXIT_LAYOUTS = {"every-block": {"num-exits": 4}, "blocks-1-3": {"num-exits": 2,
                                                                "exit-blocks": "1,3"}}


# -- the reference: plain tensor operations only ------------------------------------------

def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact (erf) GELU


def _softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _self_attention(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, heads: int,
                    scale: float) -> torch.Tensor:
    batch, tokens, _ = x.shape

    def split(name: str) -> torch.Tensor:  # [B, T, H, d_head]
        return _linear(x, p, f"{prefix}.{name}").reshape(batch, tokens, heads, -1)

    q, k, v = split("q"), split("k"), split("v")
    weights = _softmax(torch.einsum("bihd,bjhd->bhij", q, k) * scale)  # no mask
    out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, tokens, -1)
    return _linear(out, p, f"{prefix}.proj")


def _pre_ln_layer(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, heads: int,
                  scale: float, eps: float) -> torch.Tensor:
    """x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x)))); with LayerScale (the stable Ree,
    docs/method.md §2a) each branch is first multiplied by its per-channel gain."""
    one = torch.ones(x.shape[-1], dtype=x.dtype)
    gain1, gain2 = p.get(f"{prefix}.ls1.gamma", one), p.get(f"{prefix}.ls2.gamma", one)
    x = x + gain1 * _self_attention(_layer_norm(x, p[f"{prefix}.norm1.weight"],
                                                p[f"{prefix}.norm1.bias"], eps), p,
                                    f"{prefix}.attn", heads, scale)
    y = _layer_norm(x, p[f"{prefix}.norm2.weight"], p[f"{prefix}.norm2.bias"], eps)
    return x + gain2 * _linear(_gelu(_linear(y, p, f"{prefix}.mlp.fc1")), p,
                               f"{prefix}.mlp.fc2")


def _patch_tokens(images: torch.Tensor, p: dict[str, torch.Tensor], patch: int
                  ) -> torch.Tensor:
    """The strided convolution as a matmul on flattened non-overlapping patches."""
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // patch, patch, w // patch, patch)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), -1)
    weight = p["backbone.patch_embed.proj.weight"]
    return patches @ weight.reshape(weight.shape[0], -1).T + p["backbone.patch_embed.proj.bias"]


def reference_logits(p: dict[str, torch.Tensor], cfg: RunConfig, images: torch.Tensor
                     ) -> list[torch.Tensor]:
    """METHOD.md §2's forward pass of the full model, every exit's logits."""
    bb = cfg.backbone
    dim, blocks, heads = bb["embed_dim"], bb["depth"], bb["num_heads"]
    backbone_scale = (dim // heads) ** -0.5
    ree_scale = cfg.ree_attn_dim ** -0.5  # the total attention width, not the head size
    exits = cfg.exit_block_list
    batch = images.shape[0]

    cls = p["backbone.cls_token"].expand(batch, 1, dim)
    h = torch.cat([cls, _patch_tokens(images, p, bb["patch_size"])], dim=1) \
        + p["backbone.pos_embed"]
    meta = p["exits.meta_token"].expand(batch, 1, dim)
    history: list[torch.Tensor] = []
    logits = []
    for block in range(blocks):
        h = _pre_ln_layer(h, p, f"backbone.blocks.{block}", heads, backbone_scale, 1e-6)
        current = h[:, :1]
        if block not in exits and not cfg.modulation:
            history.append(current)  # Ree's output is not read: skipping it changes nothing
            continue
        out = torch.cat([meta, *history, current], dim=1)  # block + 2 tokens
        out = out + p["exits.pos_embed"][:, : block + 2]
        for layer in range(cfg.ree_depth):  # each layer repeated, with its own weights
            for _ in range(cfg.ree_recurrent_steps):
                out = _pre_ln_layer(out, p, f"exits.layers.{layer}", cfg.ree_heads, ree_scale,
                                    1e-5)
        if block in exits:  # meta output + the current (unmodulated) class token
            token = _layer_norm(out[:, 0] + current[:, 0], p["exits.head.norm.weight"],
                                p["exits.head.norm.bias"], 1e-5)
            logits.append(_linear(token, p, "exits.head.fc"))
        if cfg.modulation:
            history.append(out[:, -1:])
            h = torch.cat([out[:, -1:], h[:, 1:]], dim=1)
        else:
            history.append(current)
    return logits


# -- the comparison -----------------------------------------------------------------------

def _config(layout: str, ree_depth: int, steps: int, modulation: bool,
            layer_scale: float = 0.0) -> RunConfig:
    return RunConfig.from_flat({**BACKBONE, **EXIT_LAYOUTS[layout], "ree-depth": ree_depth,
                                "ree-recurrent-steps": steps, "modulation": modulation,
                                "ree-layer-scale": layer_scale})


def _model_at_scale_one(cfg: RunConfig, seed: int = 0) -> torch.nn.Module:
    """The full model in float64 with every parameter redrawn at scale ~1 (LayerNorm gains
    around 1), so that every part of Ree moves the logits by O(1)."""
    model = build_method(cfg, TASK).build_global_model().double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if "norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".weight") and param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))  # fan-in scaling
            else:
                param.copy_(0.5 * noise)
    return model


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


@pytest.mark.parametrize("layout", list(EXIT_LAYOUTS))
@pytest.mark.parametrize("modulation", [True, False], ids=["modulation", "no-modulation"])
@pytest.mark.parametrize(("ree_depth", "steps"), [(1, 1), (2, 1), (1, 3), (2, 2)],
                         ids=["d1-r1", "d2-r1", "d1-r3", "d2-r2"])
@pytest.mark.parametrize("layer_scale", [0.0, 0.01], ids=["paper", "stable"])
def test_every_exit_matches_the_hand_written_reference(layout: str, modulation: bool,
                                                       ree_depth: int, steps: int,
                                                       layer_scale: float) -> None:
    cfg = _config(layout, ree_depth, steps, modulation, layer_scale)
    model = _model_at_scale_one(cfg)
    assert len(model.exits.layers) == ree_depth and model.exits.recurrent_steps == steps
    gains = [n for n, _ in model.named_parameters() if n.startswith("exits.") and "gamma" in n]
    assert len(gains) == (2 * ree_depth if layer_scale else 0)  # redrawn at scale ~1 below
    x = _images()
    with torch.no_grad():
        got = model(x)
        expected = reference_logits(dict(model.named_parameters()), cfg, x)
    assert len(got) == len(expected) == cfg.num_exits
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"exit {k}")
    # not a near-constant: the exits and the samples differ by O(1)
    assert min((got[k] - got[k + 1]).abs().max().item() for k in range(len(got) - 1)) > 0.1
    assert (got[-1][0] - got[-1][1]).abs().max().item() > 0.1


@pytest.mark.parametrize("layer_scale", [0.0, 0.01], ids=["paper", "stable"])
def test_default_initialisation_in_float32_matches_the_reference(layer_scale: float) -> None:
    """The model as built (float32, trunc-normal initialisation), depth 2 and 2 steps."""
    cfg = _config("blocks-1-3", 2, 2, True, layer_scale)
    model = build_method(cfg, TASK).build_global_model().eval()
    x = _images().float()
    with torch.no_grad():
        got = model(x)
        params = {k: v.double() for k, v in model.named_parameters()}
        expected = reference_logits(params, cfg, x.double())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_recurrent_steps_and_layers_are_not_interchangeable() -> None:
    """The reference itself tells the configurations apart (so the parametrised comparison
    above could fail): (2 layers, 1 step) vs (1, 2) on shared weights, and the order
    layer-major (each layer R times) vs step-major (the stack R times)."""
    cfg = _config("blocks-1-3", 2, 2, True)
    params = dict(_model_at_scale_one(cfg).named_parameters())
    x = _images()
    with torch.no_grad():
        layer_major = reference_logits(params, cfg, x)[-1]
        one_step = reference_logits(params, _config("blocks-1-3", 2, 1, True), x)[-1]
    assert (layer_major - one_step).abs().max().item() > 0.1


# -- one tiny Ree with weights set by hand -------------------------------------------------

def _hand_set_ree(recurrent_steps: int) -> Ree:
    """d = 2, one head of width 2, two blocks, an exit after block 1 only.

    q and k are zero (uniform attention), v and proj the identity, the MLP zero: each layer
    adds to every token the mean over tokens of LN(token). In two dimensions LN([a, b]) is
    ±t·[1, −1] with t = |a − b|/2 / sqrt(((a − b)/2)² + eps), i.e. 1 up to eps."""
    ree = Ree(2, 2, num_blocks=2, exit_blocks=[1], num_heads=1, attn_dim=2, mlp_ratio=1.0,
              recurrent_steps=recurrent_steps).double()
    with torch.no_grad():
        for param in ree.parameters():
            param.zero_()
        ree.meta_token.copy_(torch.tensor([[[1.0, -1.0]]]))
        ree.pos_embed.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]))
        layer = ree.layers[0]
        for norm in (layer.norm1, layer.norm2, ree.head.norm):
            norm.weight.fill_(1.0)
        layer.attn.v.weight.copy_(torch.eye(2))
        layer.attn.proj.weight.copy_(torch.eye(2))
        ree.head.fc.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        ree.head.fc.bias.copy_(torch.tensor([0.5, 0.0]))
    return ree


def _t(half_difference: float, eps: float = 1e-5) -> float:
    return abs(half_difference) / math.sqrt(half_difference**2 + eps)


def test_a_hand_set_ree_gives_the_values_written_down() -> None:
    ree = _hand_set_ree(recurrent_steps=1)
    history: list[torch.Tensor] = []
    # block 0 (no exit, modulation): S = [meta + P0, c0 + P1] = [[1, -1], [4, 1]];
    # LN gives t·[1, -1] for both (half differences 1 and 1.5), mean t̄·[1, -1]
    c0 = torch.tensor([[[3.0, 1.0], [7.0, 7.0]]], dtype=torch.float64)  # class token, a patch
    h0, none = ree.after_block(0, c0, history)
    mean0 = (_t(1.0) + _t(1.5)) / 2
    modulated0 = [4.0 + mean0, 1.0 - mean0]  # ≈ [5, 0]
    assert none is None
    torch.testing.assert_close(h0, torch.tensor([[modulated0, [7.0, 7.0]]],
                                                dtype=torch.float64), rtol=0, atol=1e-12)
    assert len(history) == 1
    # block 1 (exit): S = [meta + P0, modulated0 + P1, c1 + P2] = [[1, -1], [≈6, 0], [0, 2]]
    c1 = torch.tensor([[[0.0, 2.0], [7.0, 7.0]]], dtype=torch.float64)
    h1, logits = ree.after_block(1, c1, history)
    m = (_t(1.0) + _t((modulated0[0] + 1.0 - modulated0[1]) / 2) - _t(1.0)) / 3  # ≈ 1/3
    meta_out = [1.0 + m, -1.0 - m]  # ≈ [4/3, -4/3]
    modulated1 = [0.0 + m, 2.0 - m]  # ≈ [1/3, 5/3]
    head_in = [meta_out[0] + 0.0, meta_out[1] + 2.0]  # + c1 (not c1 + P2): ≈ [4/3, 2/3]
    t = _t((head_in[0] - head_in[1]) / 2)  # ≈ 1
    torch.testing.assert_close(logits, torch.tensor([[2 * t + 0.5, -t]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(h1[:, 0], torch.tensor([modulated1], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # the same in round numbers, eps aside
    torch.testing.assert_close(logits, torch.tensor([[2.5, -1.0]], dtype=torch.float64),
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(h1[:, 0], torch.tensor([[1 / 3, 5 / 3]], dtype=torch.float64),
                               rtol=0, atol=1e-3)


def test_a_hand_set_ree_repeats_its_layer_recurrent_steps_times() -> None:
    # block 0 with 2 steps: after step 1 the tokens are [1 + t̄, -1 - t̄] and [4 + t̄, 1 - t̄]
    # (half differences 1 + t̄ and 1.5 + t̄); step 2 adds their mean LN again: ≈ [6, -1]
    ree = _hand_set_ree(recurrent_steps=2)
    c0 = torch.tensor([[[3.0, 1.0]]], dtype=torch.float64)
    h0, _ = ree.after_block(0, c0, [])
    first = (_t(1.0) + _t(1.5)) / 2
    second = (_t(1.0 + first) + _t(1.5 + first)) / 2
    torch.testing.assert_close(h0, torch.tensor([[[4.0 + first + second,
                                                   1.0 - first - second]]],
                                                dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h0, torch.tensor([[[6.0, -1.0]]], dtype=torch.float64),
                               rtol=0, atol=1e-4)
