"""Loading DeiT checkpoints into the backbone (docs/method.md §1): formats, names, fitting,
download."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from reefl.methods.aggregate import slice_to
from reefl.models import VisionTransformer, checkpoints
from reefl.models.checkpoints import (
    CheckpointError,
    backbone_weights,
    fit_to,
    interpolate_pos_embed,
    load_backbone,
    resolve_checkpoint,
    to_backbone_names,
)

DIM, DEPTH, HIDDEN, PATCHES = 24, 3, 48, 16  # a 32-px image in 8-px patches: a 4x4 grid


def vit(**overrides: int) -> VisionTransformer:
    """The small backbone the checkpoints below are made for (``overrides`` change it)."""
    kwargs = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=DIM, depth=DEPTH,
                  num_heads=3, mlp_ratio=2.0) | overrides
    return VisionTransformer(**kwargs)


def timm_state(distilled: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under timm's names (fused qkv, final norm, head), with marked values:
    7 at row d+2 of block 1's qkv weight (k row 2) and 5 at entry 2d+1 of its bias (v 1)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "cls_token": (1, 1, DIM),
        "pos_embed": (1, 1 + distilled + PATCHES, DIM),
        "patch_embed.proj.weight": (DIM, 3, 8, 8), "patch_embed.proj.bias": (DIM,),
        "norm.weight": (DIM,), "norm.bias": (DIM,), "head.weight": (10, DIM), "head.bias": (10,),
    }
    for i in range(DEPTH):
        shapes |= {
            f"blocks.{i}.norm1.weight": (DIM,), f"blocks.{i}.norm1.bias": (DIM,),
            f"blocks.{i}.attn.qkv.weight": (3 * DIM, DIM), f"blocks.{i}.attn.qkv.bias": (3 * DIM,),
            f"blocks.{i}.attn.proj.weight": (DIM, DIM), f"blocks.{i}.attn.proj.bias": (DIM,),
            f"blocks.{i}.norm2.weight": (DIM,), f"blocks.{i}.norm2.bias": (DIM,),
            f"blocks.{i}.mlp.fc1.weight": (HIDDEN, DIM), f"blocks.{i}.mlp.fc1.bias": (HIDDEN,),
            f"blocks.{i}.mlp.fc2.weight": (DIM, HIDDEN), f"blocks.{i}.mlp.fc2.bias": (DIM,),
        }
    if distilled:
        shapes |= {"dist_token": (1, 1, DIM), "head_dist.weight": (10, DIM),
                   "head_dist.bias": (10,)}
    state = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    state["blocks.1.attn.qkv.weight"][DIM + 2] = 7.0
    state["blocks.1.attn.qkv.bias"][2 * DIM + 1] = 5.0
    return state


def expected(ckpt: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """What backbone tensor ``key`` should hold: its rows of the fused qkv, or the same name."""
    match = re.fullmatch(r"blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)", key)
    if match is None:
        return ckpt[key]
    part = "qkv".index(match[2])
    return ckpt[f"blocks.{match[1]}.attn.qkv.{match[3]}"][part * DIM:(part + 1) * DIM]


def assert_loaded(model: VisionTransformer, ckpt: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, slice_to(expected(ckpt, key), value.shape)), key


def save(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    """Write ``state`` as an official DeiT .pth, a timm .safetensors, or a DataParallel dump."""
    if fmt == "official":
        torch.save({"model": state}, path.with_suffix(".pth"))
    elif fmt == "timm":
        safetensors.torch.save_file(state, path.with_suffix(".safetensors"))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}},
                   path.with_suffix(".pt"))
    return next(path.parent.glob(path.name + ".*"))


@pytest.mark.parametrize("fmt", ["official", "timm", "wrapped"])
def test_every_backbone_tensor_comes_from_the_checkpoint(tmp_path: Path, fmt: str) -> None:
    ckpt = timm_state()
    model = vit()
    load_backbone(model, str(save(ckpt, tmp_path / "x", fmt)), "deit-small")
    assert_loaded(model, ckpt)
    assert model.blocks[1].attn.k.weight[2].eq(7.0).all()
    assert model.blocks[1].attn.v.bias[1] == 5.0
    assert all(p.requires_grad for p in model.parameters())


def test_shallower_backbone_ignores_deeper_blocks(tmp_path: Path) -> None:
    ckpt = timm_state()
    model = vit(depth=2)
    load_backbone(model, str(save(ckpt, tmp_path / "x", "timm")), "deit-small")
    assert_loaded(model, ckpt)


def test_distilled_checkpoint_drops_the_distillation_token(tmp_path: Path) -> None:
    ckpt = timm_state(distilled=True)
    weights = backbone_weights(str(save(ckpt, tmp_path / "x", "official")), "deit-small")
    assert not any(k.startswith(("dist_token", "head", "norm.")) for k in weights)
    model = vit()
    load_backbone(model, str(tmp_path / "x.pth"), "deit-small")
    pos = ckpt["pos_embed"]
    assert torch.equal(model.pos_embed, torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    assert_loaded(model, ckpt | {"pos_embed": model.pos_embed.detach()})


def test_pos_embed_interpolation_keeps_the_class_row() -> None:
    pos = torch.randn(1, 1 + PATCHES, DIM)
    assert interpolate_pos_embed(pos, PATCHES) is pos
    small = interpolate_pos_embed(pos, 4)
    grid = pos[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False, antialias=True)
    assert small.shape == (1, 5, DIM)
    assert torch.equal(small[:, 0], pos[:, 0])
    assert torch.allclose(small[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 4, DIM))
    with pytest.raises(CheckpointError, match="not square"):
        interpolate_pos_embed(pos, 8)


def test_smaller_image_and_grey_input_are_adapted(tmp_path: Path) -> None:
    ckpt = timm_state()
    model = vit(img_size=16, in_chans=1)
    load_backbone(model, str(save(ckpt, tmp_path / "x", "timm")), "deit-small")
    assert torch.equal(model.pos_embed, interpolate_pos_embed(ckpt["pos_embed"], 4))
    weight = ckpt["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.patch_embed.proj.weight, weight)


def test_narrower_backbone_takes_leading_blocks_only_when_allowed(tmp_path: Path) -> None:
    ckpt = timm_state()
    path = str(save(ckpt, tmp_path / "x", "timm"))
    narrow = vit(embed_dim=12, attn_dim=12, mlp_hidden=24)
    load_backbone(narrow, path, "deit-small", allow_narrower=True)
    assert_loaded(narrow, ckpt)
    first, value = next(iter(narrow.state_dict().items()))
    full, small = tuple(expected(ckpt, first).shape), tuple(value.shape)
    message = f"checkpoint tensor '{first}' has shape {full}, the model expects {small}"
    with pytest.raises(CheckpointError) as error:
        load_backbone(vit(embed_dim=12, attn_dim=12, mlp_hidden=24), path, "deit-small")
    assert str(error.value) == message


def test_fit_to_names_the_first_mismatching_or_missing_key() -> None:
    state = to_backbone_names(timm_state())
    target = {"cls_token": torch.Size([1, 1, DIM]),
              "blocks.0.attn.q.weight": torch.Size([12, 12]),
              "blocks.0.attn.k.weight": torch.Size([12, 12])}
    with pytest.raises(CheckpointError, match=r"^checkpoint tensor 'blocks.0.attn.q.weight' "
                                              r"has shape \(24, 24\), the model expects"):
        fit_to(state, target)
    del state["blocks.1.mlp.fc2.bias"]
    shapes = {k: v.shape for k, v in vit().state_dict().items()}
    with pytest.raises(CheckpointError, match="'blocks.1.mlp.fc2.bias'"):
        fit_to(state, shapes)


def test_official_download_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = save(timm_state(), tmp_path / "deit_small_patch16_224-xxxx", "official")
    monkeypatch.setitem(checkpoints.OFFICIAL_URLS, "deit-small", source.as_uri())
    cache = tmp_path / "cache"
    path = resolve_checkpoint("official", "deit-small", cache)
    assert path == cache / source.name
    assert path.read_bytes() == source.read_bytes()
    source.unlink()
    assert resolve_checkpoint("official", "deit-small", cache) == path
    assert list(cache.iterdir()) == [path]


def test_timm_download_goes_to_torch_home(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = timm_state()
    repo = tmp_path / "hub" / "timm" / "deit_small_x" / "resolve" / "main"
    repo.mkdir(parents=True)
    source = save(ckpt, repo / "model", "timm")
    monkeypatch.setitem(checkpoints.TIMM_URLS, "deit-small", source.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    model = vit()
    load_backbone(model, "timm", "deit-small")
    assert (tmp_path / "home" / "hub" / "checkpoints" / "deit_small_x.safetensors").is_file()
    assert_loaded(model, ckpt)


def test_a_file_is_read_once_until_it_changes(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    read = checkpoints.read_checkpoint

    def counted_read(path: Path) -> dict[str, torch.Tensor]:
        reads.append(path)
        return read(path)

    monkeypatch.setattr(checkpoints, "read_checkpoint", counted_read)
    path = save(timm_state(), tmp_path / "x", "timm")
    for _ in range(3):
        load_backbone(vit(), str(path), "deit-small")
    assert len(reads) == 1
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    load_backbone(vit(), str(path), "deit-small")
    assert len(reads) == 2


def test_unknown_model_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'custom'.*deit-base, deit-small, deit-tiny"):
        resolve_checkpoint("official", "custom", tmp_path)
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        resolve_checkpoint(str(tmp_path / "nowhere.pth"), "deit-small")
