"""A source split into a global test set and per-client shards (each with its own local test
split), and the loaders that turn stored examples into model inputs batch by batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from reefl.data import cache
from reefl.data.partition import (
    dirichlet_partition,
    draw_by_mix,
    equal_dirichlet_partition,
    natural_partition,
    select_groups,
    split_per_class,
    stratified_split,
)
from reefl.data.sources import SourceOptions, load_source, source_entry
from reefl.data.spec import DataError, DataSpec, Split
from reefl.data.transforms import (
    normalize,
    random_flip,
    random_resized_crop,
    random_translate,
    resize,
)
from reefl.outputs.files import atomic_write

PARTITIONERS = ("auto", "dirichlet", "equal-dirichlet", "natural")
MAX_SHIFT = 2  # "translate": digits tolerate small shifts; flips would make other symbols
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXACT_STATS_LIMIT = 1 << 26  # up to this many values, stats in one float32 pass
PARTITION_VERSION = 2  # bump when a partitioner's output changes (2: stats on one thread)


@dataclass(frozen=True)
class DataOptions:
    """Everything that fixes a run's data and partition (hashable: it keys the cache)."""

    source: SourceOptions = SourceOptions()
    num_clients: int = 20
    partitioner: str = "auto"
    alpha: float = 1.0
    test_fraction: float = 0.2
    local_test_fraction: float = 0.2
    seed: int = 0
    train_examples: int = 0
    """If > 0, a seeded uniform sample of this many training examples is partitioned (label
    skew only): for experiments that must be small."""
    test_examples: int = 0
    """If > 0, the global test set is a seeded uniform sample of this many examples."""
    validation_fraction: float = 0.0
    """Share of the training pool held out from every client (per class, seeded): the
    validation split that early-exit thresholds are calibrated on. 0: none, and the
    partition is exactly what it is without this option."""


@dataclass(frozen=True)
class FederatedData:
    """The same in every process that builds it from the same options.

    ``client_indices[i]`` index ``train`` (client i's training shard), ``test_indices``
    index ``test`` (the global test set), ``client_test_indices[i]`` index ``local_test``
    (client i's local test split: drawn from the global test set with the client's class
    mix, or, for natural partitions, split off the client's own data). Some of the three
    splits may be the same one.
    ``mean``/``std`` are per-channel statistics of the training pool (the shards).
    """

    spec: DataSpec
    test: Split
    test_indices: np.ndarray
    client_indices: list[np.ndarray]
    local_test: Split
    client_test_indices: list[np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    partitioner: str
    client_groups: tuple[str, ...] = ()
    validation_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Indices of ``train`` that no client holds (``validation-fraction``): the data
    that exit thresholds are calibrated on, never the test set."""

    @property
    def train(self) -> Split:
        """The split client shards index: the source's training split."""
        return self.spec.train

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


@lru_cache(maxsize=4)
def build_federated_data(options: DataOptions) -> FederatedData:
    """Partition the source as ``options`` say. Deterministic in them, so every process
    gets the same; computed once per machine and kept in the on-disk cache (partitioning
    imports flwr-datasets and Hugging Face datasets, seconds in every one of a run's
    processes), and once per process in memory because clients share a process."""
    spec = load_source(options.source)
    path = partition_path(options)
    if path is not None and path.is_file():
        return _read_partition(path, spec)
    data = _partition(spec, options)
    if path is not None:
        _write_partition(path, data)
    return data


def partition_path(options: DataOptions) -> Path | None:
    """Where the partition of ``options`` is cached: keyed by the source's own cache entry
    (its content), every option, and the partitioning code's version. (None: not cached;
    tests that feed ``load_source`` sources of their own say so.)"""
    name = cache.entry_name("partition", source_entry(options.source), repr(options),
                            PARTITION_VERSION, version("flwr-datasets"))
    return cache.cache_root() / "partitions" / f"{name}.npz"


def _write_partition(path: Path, data: FederatedData) -> None:
    """The index arrays and statistics of ``data``, written atomically (temporary file,
    then rename), so a reader never sees half a file."""
    def ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lengths = [len(a) for a in arrays]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return flat.astype(np.int64), np.cumsum([0, *lengths]).astype(np.int64)

    meta = {"test": "test" if data.test is data.spec.test else "train",
            "local_test": "test" if data.local_test is data.spec.test else "train",
            "mean": data.mean, "std": data.std, "partitioner": data.partitioner,
            "client_groups": list(data.client_groups)}
    shards, shard_ends = ragged(data.client_indices)
    local, local_ends = ragged(data.client_test_indices)
    with atomic_write(path) as tmp, tmp.open("wb") as file:  # the cache is shared
        np.savez(file, test_indices=data.test_indices, shards=shards, shard_ends=shard_ends,
                 local=local, local_ends=local_ends, meta=np.array(json.dumps(meta)),
                 validation=np.asarray(data.validation_indices, np.int64))


def _read_partition(path: Path, spec: DataSpec) -> FederatedData:
    """The partition ``_write_partition`` wrote, over the source ``spec``."""
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    meta = json.loads(str(arrays["meta"]))

    def split(name: str) -> Split:
        return spec.test if name == "test" else spec.train

    def unflatten(flat: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]

    return FederatedData(
        spec, split(meta["test"]), arrays["test_indices"],
        unflatten(arrays["shards"], arrays["shard_ends"]), split(meta["local_test"]),
        unflatten(arrays["local"], arrays["local_ends"]), tuple(meta["mean"]),
        tuple(meta["std"]), meta["partitioner"], tuple(meta["client_groups"]),
        arrays["validation"])


def _partition(spec: DataSpec, options: DataOptions) -> FederatedData:
    """Partition ``spec`` as ``options`` say (what ``build_federated_data`` caches)."""
    partitioner = resolve_partitioner(spec, options.partitioner)
    try:
        if partitioner == "natural":
            return _natural(spec, options)
        return _label_skew(spec, options, partitioner)
    except DataError:
        raise
    except ValueError as err:  # a partition the data cannot give (too many clients, ...)
        raise DataError(f"{spec.name}: {err}") from None


def _label_skew(spec: DataSpec, options: DataOptions, partitioner: str) -> FederatedData:
    """Dirichlet partitions of a pool; local tests drawn from the global test set with each
    client's class mix. The global test set is the source's test split, else a stratified
    ``test_fraction`` of its training split."""
    if spec.test is not None:
        test, test_idx = spec.test, np.arange(len(spec.test))
        pool = np.arange(len(spec.train))
    else:
        pool, test_idx = stratified_split(spec.train.labels, options.test_fraction, options.seed)
        test = spec.train
    pool = sample_indices(pool, options.train_examples, [options.seed, 6])
    test_idx = sample_indices(test_idx, options.test_examples, [options.seed, 7])
    pool, validation = hold_out_validation(pool, np.asarray(spec.train.labels),
                                           options.validation_fraction, [options.seed, 8])
    pool_labels = np.asarray(spec.train.labels[pool])
    if partitioner == "dirichlet":
        positions = dirichlet_partition(pool_labels, options.num_clients, options.alpha,
                                        options.seed)
        mixes = np.stack([np.bincount(pool_labels[p], minlength=spec.num_classes)
                          for p in positions]).astype(float)
        mixes /= mixes.sum(axis=1, keepdims=True)
    else:
        positions, mixes = equal_dirichlet_partition(pool_labels, options.num_clients,
                                                     options.alpha, options.seed,
                                                     spec.num_classes)
    shards = [pool[p] for p in positions]
    test_labels = np.asarray(test.labels[test_idx])
    local = draw_by_mix(test_labels, mixes, len(test_idx) // options.num_clients,
                        np.random.default_rng([options.seed, 4]))
    mean, std = _stats(spec, pool)
    return FederatedData(spec, test, test_idx, shards, test,
                         [test_idx[i] for i in local], mean, std, partitioner,
                         validation_indices=validation)


def tested_train_indices(data: FederatedData) -> np.ndarray:
    """Sorted indices of the source's training split that a run on ``data`` tests on: its
    global test set and the clients' local tests, where these come from the training split
    (a source without a test split); empty when the run tests on the source's test split."""
    parts = [data.test_indices] if data.test is data.spec.train else []
    if data.local_test is data.spec.train:
        parts += list(data.client_test_indices)
    return (np.unique(np.concatenate(parts)).astype(np.int64) if parts
            else np.zeros(0, np.int64))


def hold_out_validation(pool: np.ndarray, labels: np.ndarray, fraction: float,
                        seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(rest, validation): ``fraction`` of every class of ``pool`` (indices into
    ``labels``) held out, drawn from ``seed``; with ``fraction`` 0, ``pool`` untouched and no
    validation (no random draw, so partitions without a validation split do not change)."""
    if fraction <= 0:
        return pool, pool[:0]
    rest, held = stratified_split(np.asarray(labels[pool]), fraction, seed)
    return pool[rest], pool[held]


def sample_indices(indices: np.ndarray, count: int, seed: list[int]) -> np.ndarray:
    """``count`` of ``indices`` drawn uniformly without replacement (sorted), or all of them
    when ``count`` is 0 or not smaller."""
    if count <= 0 or count >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=count, replace=False))


def resolve_partitioner(spec: DataSpec, partitioner: str) -> str:
    """``auto``: natural when the source has natural ids, else Dirichlet."""
    if partitioner not in PARTITIONERS:
        raise DataError(f"partitioner must be one of {', '.join(PARTITIONERS)}; "
                        f"got '{partitioner}'")
    if partitioner == "auto":
        return "natural" if spec.train.groups is not None else "dirichlet"
    if partitioner == "natural" and spec.train.groups is None:
        raise DataError(f"partitioner='natural' needs natural ids, and {spec.name} has none; "
                        "set partition-by to a column")
    return partitioner


def _natural(spec: DataSpec, options: DataOptions) -> FederatedData:
    """One client per natural id, each id's data split into local train and test per class;
    the global test set is the source's test split, else the union of the local tests."""
    if options.train_examples or options.test_examples:
        raise DataError("train-examples and test-examples apply to label-skew partitions "
                        "(partitioner dirichlet or equal-dirichlet), not to natural ids")
    groups = np.asarray(spec.train.groups)
    chosen = select_groups(groups, options.num_clients, spec.natural or "sample", options.seed)
    labels = np.asarray(spec.train.labels)
    rng = np.random.default_rng([options.seed, 5])
    parts = [split_per_class(shard, labels, options.local_test_fraction, rng)
             for shard in natural_partition(groups, chosen, options.seed)]
    shards, local_tests = [train for train, _ in parts], [test for _, test in parts]
    held = [hold_out_validation(shard, labels, options.validation_fraction,
                                [options.seed, 8, i]) for i, shard in enumerate(shards)]
    shards = [rest for rest, _ in held]
    validation = np.sort(np.concatenate([v for _, v in held])) if held else np.zeros(0, int)
    if spec.test is not None:
        test, test_idx = spec.test, np.arange(len(spec.test))
    else:
        test, test_idx = spec.train, np.sort(np.concatenate(local_tests))
    mean, std = _stats(spec, np.sort(np.concatenate(shards)))
    names = tuple(spec.group_names[g] for g in chosen)
    return FederatedData(spec, test, test_idx, shards, spec.train, local_tests,
                         mean, std, "natural", names, validation.astype(np.int64))


def _stats(spec: DataSpec, pool: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training examples ``pool`` (pixels in [0, 1] for
    images, log-mel values for audio): one float32 pass for small pools, chunked float64 sums
    for large ones."""
    inputs = spec.train.inputs
    scale = 255.0 if spec.kind == "image" else 1.0
    channels = inputs.shape[1]
    if len(pool) * inputs[0].size <= EXACT_STATS_LIMIT:
        values = torch.from_numpy(np.asarray(inputs[pool])).float().div(scale)
        values = values.transpose(0, 1).flatten(1)
        # one thread: a float32 reduction's last bits depend on the thread count, and the
        # stats must not depend on which process (launcher, server, client) computed them
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return tuple(values.mean(dim=1).tolist()), tuple(values.std(dim=1).tolist())
        finally:
            torch.set_num_threads(threads)
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(pool), 4096):
        chunk = np.asarray(inputs[pool[start:start + 4096]], dtype=np.float64) / scale
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
        count += chunk[:, 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0) * count / max(count - 1, 1))
    return tuple(mean.tolist()), tuple(std.tolist())


# -- turning stored examples into model inputs ------------------------------------------


@dataclass(frozen=True)
class InputPipeline:
    """From stored examples to the model's input: [B, channels, size, size] float32.

    Training augmentation (when ``augment``): the source's own (``translate``: up to 2 px;
    ``crop``: RandomResizedCrop with ``crop_scale`` and, if ``flip``, horizontal flips;
    audio: a time shift of up to 100 ms and background noise, in the feature domain). Then
    normalisation, a resize to ``size`` (images not already cropped to it, and audio
    features), and grey repeated on 3 channels when the backbone takes 3.
    """

    kind: str
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    augmentation: str = "crop"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    noise: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator | None
                 ) -> torch.Tensor:
        """Model inputs from a stored batch; ``generator`` set means training."""
        train = self.augment and generator is not None
        if self.kind == "audio":
            x = inputs.float()
            if train:
                from reefl.data.audio import augment_features

                x = augment_features(x, self.noise, generator)
            x = resize((x - self.mean[0]) / self.std[0], self.size)
        elif train and self.augmentation == "translate":
            x = resize(normalize(random_translate(inputs, MAX_SHIFT, generator),
                                 self.mean, self.std), self.size)
        elif train:
            x = random_resized_crop(inputs.float(), self.size, self.crop_scale, generator)
            if self.flip:
                x = random_flip(x, generator)
            x = normalize(x, self.mean, self.std)
        else:
            x = resize(normalize(inputs, self.mean, self.std), self.size)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


def input_pipeline(data: FederatedData, img_size: int, pretrained: bool, augment: bool
                   ) -> InputPipeline:
    """The run's pipeline: 3 channels and ImageNet statistics with a pretrained backbone
    (grey images repeated; audio keeps its own statistics), else the data's own."""
    spec = data.spec
    channels = 3 if pretrained else spec.channels
    mean, std = data.mean, data.std
    if pretrained and spec.kind == "image":  # grey broadcasts to 3 channels as it is normalised
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    noise = None if spec.noise is None else torch.from_numpy(np.asarray(spec.noise,
                                                                        dtype=np.float32))
    return InputPipeline(spec.kind, img_size, channels, tuple(mean), tuple(std), augment,
                         spec.augmentation, spec.crop_scale, spec.flip, noise)
