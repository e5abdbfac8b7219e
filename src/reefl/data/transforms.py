"""Pure-torch image transforms (torchvision is not available here)."""

import torch
import torch.nn.functional as F


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Map uint8 pixels to float32 in [0, 1], then standardise each channel with the given stats."""
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    return (images.float() / 255.0 - mean_t) / std_t


def random_translate(
    batch: torch.Tensor, max_shift: int, generator: torch.Generator
) -> torch.Tensor:
    """Shift each image of [B, C, H, W] by its own random offset of up to max_shift pixels per axis.

    Equivalent to zero-padding by max_shift and taking a random crop of the original size, so it
    should run on raw pixels (before normalisation) where zero is the background. Drawing the
    offsets from the given generator keeps augmentation reproducible.
    """
    b, c, h, w = batch.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator)
    padded = F.pad(batch, (max_shift,) * 4)
    rows = (max_shift - shifts[0]).view(b, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)
    cols = (max_shift - shifts[1]).view(b, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
