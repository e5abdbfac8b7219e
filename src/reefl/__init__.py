"""reefl: ReeFL and its baselines, federated on Flower. ``reefl.load(path)`` gives a trained
run's (or an exported tier's) model for early-exit prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reefl.anytime import AnytimeModel


def load(path: Any, tier: int | None = None) -> AnytimeModel:
    """The model of a run folder or an exported tier (``reefl.anytime.load``); imported on
    first use, so ``import reefl`` stays light for the Flower apps."""
    from reefl.anytime import load as load_model

    return load_model(path, tier)
