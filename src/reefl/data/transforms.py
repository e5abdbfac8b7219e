"""Pure-torch image transforms (torchvision is not available here)."""

import math

import torch
import torch.nn.functional as F


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Map pixels in [0, 255] (uint8, or float after interpolation) to float32 in [0, 1], then
    standardise each channel with the given stats."""
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


def resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float [B, C, H, W] to size x size (antialiased when shrinking, as
    torchvision's Resize); the identity when it already has that size."""
    if batch.shape[-2:] == (size, size):
        return batch
    shrink = batch.shape[-2] > size or batch.shape[-1] > size
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrink)


def crop_box(height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn as torchvision draws it: up to ten
    tries of an area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the
    largest central box whose ratio is within ``ratio``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio.tolist(),
                                                  generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(batch: torch.Tensor, size: int, scale: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """Each image of float [B, C, H, W] cropped to its own random box, resized to size."""
    height, width = batch.shape[-2:]
    crops = []
    for image in batch:
        top, left, h, w = crop_box(height, width, scale, generator)
        crops.append(resize(image[None, :, top:top + h, left:left + w], size))
    return torch.cat(crops)


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of [B, C, H, W] left-right with probability 1/2."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
