"""Shared fixtures: a tiny run config, and no telemetry from Flower."""

from __future__ import annotations

import os

import pytest

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
