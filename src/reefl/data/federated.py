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


def held_out_split(
    data: FederatedData, partition_id: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of one client's shard: round(fraction·n) examples held out,
    at least one, leaving at least one to train on.

    Seeded by (seed, partition_id) only, so a client holds out the same examples in every
    round. ``fraction`` 0 holds out nothing; a one-example shard cannot be split and is
    returned as both parts.
    """
    shard = data.client_indices[partition_id]
    if fraction == 0:
        return shard, shard[:0]
    if len(shard) < 2:
        return shard, shard
    count = min(max(1, round(fraction * len(shard))), len(shard) - 1)
    order = np.random.default_rng([seed, partition_id]).permutation(len(shard))
    return np.sort(shard[order[count:]]), np.sort(shard[order[:count]])


def client_loader(
    data: FederatedData, partition_id: int, batch_size: int, seed: int, augment: bool,
    indices: np.ndarray | None = None,
) -> DataLoader:
    """Shuffled, normalised batches of one client's shard (or of ``indices`` of the training
    pool, e.g. the shard without its held-out part).

    Order and augmentation are drawn from one generator seeded from (seed, partition_id), so a run
    is reproducible while clients still differ from each other.
    """
    client_seed = int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(client_seed)
    shard = _subset(data.train, data.client_indices[partition_id] if indices is None else indices)
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
    return _ordered_loader(data, data.test, batch_size)


def held_out_loader(data: FederatedData, indices: np.ndarray, batch_size: int) -> DataLoader:
    """Normalised batches of ``indices`` of the training pool (a client's held-out part), in a
    fixed order and without augmentation."""
    return _ordered_loader(data, _subset(data.train, indices), batch_size)


def _ordered_loader(data: FederatedData, images: ImageSet, batch_size: int) -> DataLoader:
    """Normalised batches of ``images`` in their order, without augmentation."""
    collate = partial(_collate, mean=data.mean, std=data.std, augment_with=None)
    return DataLoader(
        TensorDataset(images.images, images.labels), batch_size=batch_size, collate_fn=collate
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
