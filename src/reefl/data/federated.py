"""A source split into a global test set plus per-client training shards, and loaders over them."""

from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from reefl.data.partition import dirichlet_partition, stratified_split
from reefl.data.sources import ImageSet, load_source
from reefl.data.transforms import normalize, random_translate

# Digits tolerate small translations; flips would turn them into other symbols.
MAX_SHIFT = 2


@dataclass(frozen=True)
class FederatedData:
    """Everything a server or client needs about the data; the same in every process that builds
    it from the same arguments."""

    train: ImageSet
    test: ImageSet
    client_indices: list[np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@lru_cache
def build_federated_data(
    source: str, num_clients: int, alpha: float, test_fraction: float, seed: int
) -> FederatedData:
    """Split a source into a stratified test set and a Dirichlet-partitioned training pool.

    Deterministic in its arguments, so each client process can rebuild it instead of receiving it;
    cached because that rebuild would otherwise repeat for every client in the same process.
    """
    full = load_source(source)
    train_idx, test_idx = stratified_split(full.labels.numpy(), test_fraction, seed)
    train = _subset(full, train_idx)
    pixels = train.images.float().div(255.0).transpose(0, 1).flatten(1)
    return FederatedData(
        train=train,
        test=_subset(full, test_idx),
        client_indices=dirichlet_partition(train.labels.numpy(), num_clients, alpha, seed),
        mean=tuple(pixels.mean(dim=1).tolist()),
        std=tuple(pixels.std(dim=1).tolist()),
    )


def client_loader(
    data: FederatedData, partition_id: int, batch_size: int, seed: int, augment: bool
) -> DataLoader:
    """Shuffled, normalised batches of one client's shard.

    Order and augmentation are drawn from one generator seeded from (seed, partition_id), so a run
    is reproducible while clients still differ from each other.
    """
    client_seed = int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(client_seed)
    shard = _subset(data.train, data.client_indices[partition_id])
    collate = partial(
        _collate, mean=data.mean, std=data.std, augment_with=generator if augment else None
    )
    return DataLoader(
        TensorDataset(shard.images, shard.labels),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        num_workers=0,
        drop_last=False,
    )


def test_loader(data: FederatedData, batch_size: int) -> DataLoader:
    """Normalised batches of the global test set, in a fixed order and without augmentation."""
    collate = partial(_collate, mean=data.mean, std=data.std, augment_with=None)
    return DataLoader(
        TensorDataset(data.test.images, data.test.labels), batch_size=batch_size, collate_fn=collate
    )


def _subset(data: ImageSet, indices: np.ndarray) -> ImageSet:
    """The examples of data at the given indices."""
    idx = torch.from_numpy(indices)
    return ImageSet(data.images[idx], data.labels[idx], data.num_classes)


def _collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment_with: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 examples, translate them (on raw pixels) if given a generator, then normalise."""
    images, labels = (torch.stack(column) for column in zip(*batch, strict=True))
    if augment_with is not None:
        images = random_translate(images, MAX_SHIFT, augment_with)
    return normalize(images, mean, std), labels
