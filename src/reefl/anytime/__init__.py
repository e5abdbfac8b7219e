"""Using the exits after training: early-exit prediction, calibrated thresholds, exported
tiers (``reefl predict``, ``reefl calibrate``, ``reefl export``).

Light to import (the command line imports it for its choices): the model code loads on
first use of ``load``, ``AnytimeModel`` or ``ExitPolicy``.
"""

from __future__ import annotations

import importlib
from typing import Any

CRITERIA = ("maxprob", "entropy")
"""How confidence is read off an exit's logits (``policy.confidence``)."""

_LAZY = {"AnytimeModel": "model", "ModelLoadError": "model", "Prediction": "model",
         "TierBundle": "model", "load": "model", "ExitPolicy": "policy",
         "confidence": "policy"}

__all__ = ["CRITERIA", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"reefl.anytime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'reefl.anytime' has no attribute '{name}'")
