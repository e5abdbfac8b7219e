"""Loaders over a FederatedData: a client's shuffled shard, its held-out part, its local
test split, and the global test set; each batch gathered from the stored (possibly
memory-mapped) arrays and turned into model inputs by the run's InputPipeline."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from reefl.data.federated import FederatedData, InputPipeline
from reefl.data.spec import Split


class _Examples(torch.utils.data.Dataset):
    """``indices`` of a split, fetched a whole batch at a time (one gather per batch)."""

    def __init__(self, split: Split, indices: np.ndarray) -> None:
        self.split, self.indices = split, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.indices[np.asarray(batch, dtype=np.int64)]
        return (torch.from_numpy(np.asarray(self.split.inputs[rows])),
                torch.from_numpy(np.asarray(self.split.labels[rows], dtype=np.int64)))


def _loader(split: Split, indices: np.ndarray, pipeline: InputPipeline, batch_size: int,
            generator: torch.Generator | None) -> DataLoader:
    """Batches of ``indices`` of ``split``: shuffled and augmented with ``generator``, else
    in order and plain."""
    examples = _Examples(split, indices)
    sampler = (RandomSampler(examples, generator=generator) if generator is not None
               else SequentialSampler(examples))
    return DataLoader(examples, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      batch_size=None, generator=generator, num_workers=0,
                      collate_fn=partial(_collate, pipeline=pipeline, generator=generator))


def _collate(batch: tuple[torch.Tensor, torch.Tensor], pipeline: InputPipeline,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = batch
    return pipeline(inputs, generator), labels


def held_out_split(data: FederatedData, partition_id: int, fraction: float, seed: int
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


def client_loader(data: FederatedData, pipeline: InputPipeline, partition_id: int,
                  batch_size: int, seed: int, indices: np.ndarray | None = None) -> DataLoader:
    """Shuffled, augmented (if the pipeline says so) batches of one client's shard, or of
    ``indices`` of the training split (e.g. the shard without its held-out part).

    Order and augmentation are drawn from one generator seeded from (seed, partition_id), so
    a run is reproducible while clients still differ from each other.
    """
    client_seed = int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(client_seed)
    shard = data.client_indices[partition_id] if indices is None else indices
    return _loader(data.train, shard, pipeline, batch_size, generator)


def test_loader(data: FederatedData, pipeline: InputPipeline, batch_size: int) -> DataLoader:
    """Batches of the global test set, in a fixed order and without augmentation."""
    return _loader(data.test, data.test_indices, pipeline, batch_size, None)


def client_test_loader(data: FederatedData, pipeline: InputPipeline, partition_id: int,
                       batch_size: int) -> DataLoader:
    """Batches of one client's local test split, in order and without augmentation."""
    return _loader(data.local_test, data.client_test_indices[partition_id], pipeline,
                   batch_size, None)


def held_out_loader(data: FederatedData, pipeline: InputPipeline, indices: np.ndarray,
                    batch_size: int) -> DataLoader:
    """Batches of ``indices`` of the training split (a client's held-out part), in order
    and without augmentation."""
    return _loader(data.train, indices, pipeline, batch_size, None)
