"""Using the exits after training: early-exit prediction, calibrated thresholds, exported
tiers (``reefl predict``, ``reefl calibrate``, ``reefl export``)."""

from reefl.anytime.model import AnytimeModel, ModelLoadError, Prediction, TierBundle, load
from reefl.anytime.policy import CRITERIA, ExitPolicy, confidence

__all__ = ["CRITERIA", "AnytimeModel", "ExitPolicy", "ModelLoadError", "Prediction",
           "TierBundle", "confidence", "load"]
