"""Shared fixtures: a tiny run config, and no telemetry from Flower."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from reefl.config import RunConfig  # noqa: E402

TINY = {
    "img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 4, "num-heads": 2,
    "num-exits": 4, "mlp-ratio": 2.0,
}


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A 4-block, 4-exit backbone small enough for exact comparisons in milliseconds."""
    return RunConfig.from_flat(TINY)


def timm_checkpoint(backbone: torch.nn.Module, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """``backbone``'s weights as a timm/DeiT checkpoint: q, k and v fused into ``attn.qkv``,
    plus the final ``norm`` and ``head`` that a DeiT file carries (and the loader drops)."""
    from reefl.pretrain import to_deit_names

    state = {k: v.detach().clone() for k, v in to_deit_names(backbone.state_dict()).items()}
    dim = state["cls_token"].shape[-1]
    state |= {"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim),
              "head.weight": torch.randn(num_classes, dim), "head.bias": torch.zeros(num_classes)}
    return state
