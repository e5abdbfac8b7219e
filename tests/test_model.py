"""The backbone, Ree and the exit loop (docs/method.md §1–2)."""

from __future__ import annotations

import pytest
import torch

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.models import Ree, VisionTransformer

TASK = TaskSpec(num_classes=5, in_chans=1)


def _images(cfg: RunConfig, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))


def test_exit_blocks_follow_the_rule_or_an_explicit_list() -> None:
    def blocks(num_exits: int) -> list[int]:
        flat = {"model": "deit-small", "img-size": 224, "num-exits": num_exits}
        return RunConfig.from_flat(flat).exit_block_list

    assert blocks(4) == [2, 5, 8, 11]
    assert blocks(12) == list(range(12))
    explicit = RunConfig.from_flat({"depth": 4, "num-exits": 2, "exit-blocks": "1,3"})
    assert explicit.exit_block_list == [1, 3]


def test_every_tier_gives_one_logit_tensor_per_exit(tiny_cfg: RunConfig) -> None:
    method = build_method(tiny_cfg, TASK)
    for tier in range(4):
        logits = method.build_model(tier)(_images(tiny_cfg))
        assert [tuple(z.shape) for z in logits] == [(3, 5)] * (tier + 1)


def test_sub_model_is_built_without_the_deeper_blocks(tiny_cfg: RunConfig) -> None:
    method = build_method(tiny_cfg, TASK)
    model = method.build_model(1)
    assert len(model.backbone.blocks) == 2
    assert not any(name.startswith("backbone.blocks.2") for name in model.state_dict())


@pytest.mark.parametrize("modulation", [True, False])
def test_tier_sub_model_equals_first_exits_of_full_model(modulation: bool) -> None:
    cfg = RunConfig.from_flat({**_tiny(), "modulation": modulation})
    method = build_method(cfg, TASK)
    full = method.build_global_model().eval()
    x = _images(cfg)
    full_logits = full(x)
    for tier in range(cfg.num_exits):
        sub = method.build_model(tier).eval()
        full_state = full.state_dict()
        sub.load_state_dict({k: full_state[k] for k in sub.state_dict()}, strict=True)
        for a, b in zip(sub(x), full_logits[: tier + 1], strict=False):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(sub(x)) == tier + 1


def _block_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
             for b in model.backbone.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_without_modulation_the_backbone_class_token_is_untouched() -> None:
    cfg = RunConfig.from_flat({**_tiny(), "modulation": False})
    model = build_method(cfg, TASK).build_global_model().eval()
    x = _images(cfg)
    inputs = _block_inputs(model, x)
    h = model.backbone.embed(x)
    for index, block in enumerate(model.backbone.blocks):  # the plain ViT, no exits at all
        torch.testing.assert_close(inputs[index], h, rtol=0, atol=0)
        h = block(h)


def test_with_modulation_next_block_sees_ree_last_output() -> None:
    cfg = RunConfig.from_flat(_tiny())
    model = build_method(cfg, TASK).build_global_model().eval()
    ree: Ree = model.exits
    x = _images(cfg)
    inputs = _block_inputs(model, x)
    with torch.no_grad():
        h = model.backbone.blocks[0](model.backbone.embed(x))
        meta = ree.meta_token.expand(x.shape[0], -1, -1)
        out0 = ree.transform(torch.cat([meta, h[:, :1]], dim=1))  # S = [z_meta, c] + P[0:2]
        expected1 = torch.cat([out0[:, -1:], h[:, 1:]], dim=1)
        torch.testing.assert_close(inputs[1], expected1)
        # block 2: S = [z_meta, modulated token of block 0, current token of block 1]
        h1 = model.backbone.blocks[1](expected1)
        out1 = ree.transform(torch.cat([meta, out0[:, -1:], h1[:, :1]], dim=1))
        torch.testing.assert_close(inputs[2], torch.cat([out1[:, -1:], h1[:, 1:]], dim=1))
        # exit 1's logits read the meta output plus the current (unmodulated) token
        torch.testing.assert_close(model(x)[1], ree.head(out1[:, 0] + h1[:, 0]))


def test_ree_defaults_and_parameter_count_for_deit_small() -> None:
    """docs/method.md §2: about 0.47M parameters for d = 384, C = 100, whatever K is."""
    ree = Ree(384, 100, num_blocks=12, exit_blocks=[2, 5, 8, 11])
    count = sum(p.numel() for p in ree.parameters())
    # meta 384 + P 13·384 + LN 2·768 + q/k/v 3·(384·16+16) + proj 16·384+384
    # + fc1 384·518+518 + fc2 518·384+384 + head LN 768 + fc 384·100+100
    assert count == 384 + 13 * 384 + 2 * 768 + 3 * (384 * 16 + 16) + (16 * 384 + 384) \
        + (384 * 518 + 518) + (518 * 384 + 384) + 768 + (384 * 100 + 100)
    assert 0.46e6 < count < 0.48e6
    attn = ree.layers[0].attn
    assert attn.num_heads == 8 and attn.q.out_features == 16 and attn.scale == 16**-0.5
    assert ree.layers[0].norm1.eps == 1e-5 and ree.head.norm.eps == 1e-5


def test_backbone_names_follow_timm() -> None:
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=3)
    names = set(vit.state_dict())
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.norm1.weight",
                 "blocks.0.attn.q.weight", "blocks.0.attn.v.bias", "blocks.0.attn.proj.weight",
                 "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "blocks.0.norm2.bias"):
        assert name in names
    assert vit.blocks[0].norm1.eps == 1e-6
    assert vit.embed(torch.randn(2, 3, 32, 32)).shape == (2, 5, 24)  # class token + 4 patches


def _tiny() -> dict:
    from tests.conftest import TINY
    return dict(TINY)
