"""Models: the ViT backbone, the Ree exit module, per-exit heads, and the exit loop."""

from reefl.models.early_exit import EarlyExitModel, TierExits
from reefl.models.heads import ExitHead, PerExitHeads
from reefl.models.ree import Ree
from reefl.models.vit import Block, VisionTransformer

__all__ = ["Block", "EarlyExitModel", "ExitHead", "PerExitHeads", "Ree", "TierExits",
           "VisionTransformer"]
