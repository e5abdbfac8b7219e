"""The partition cache: a partition read back from disk equals the one computed, and a cached
partition is read, not recomputed."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from reefl.data import DataOptions, SourceOptions, build_federated_data, federated, load_source
from reefl.data.federated import FederatedData, partition_path
from reefl.data.spec import DataSpec, Split


def assert_same(a: FederatedData, b: FederatedData) -> None:
    assert a.test is b.test and a.local_test is b.local_test
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    assert len(a.client_indices) == len(b.client_indices)
    for x, y in zip(a.client_indices, b.client_indices, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.client_test_indices, b.client_test_indices, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (a.mean, a.std, a.partitioner, a.client_groups) == (
        b.mean, b.std, b.partitioner, b.client_groups)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path))
    build_federated_data.cache_clear()
    yield tmp_path
    build_federated_data.cache_clear()


def test_cached_label_skew_partition_equals_the_computed_one_and_is_not_recomputed(
        cache_dir, monkeypatch):
    options = DataOptions(SourceOptions("embedded-mnist"), 7, "dirichlet", 0.3, 0.2, 0.2, 5)
    spec = load_source(options.source)
    computed = federated._partition(spec, options)
    first = build_federated_data(options)
    assert partition_path(options).is_file()
    assert_same(first, computed)
    build_federated_data.cache_clear()

    def fail(*_: object) -> None:
        raise AssertionError("partition recomputed although cached")

    monkeypatch.setattr(federated, "_partition", fail)
    again = build_federated_data(options)
    assert_same(again, computed)
    assert again.test is spec.train  # no test split in the source: a stratified part of train
    # another seed is another entry
    assert partition_path(replace(options, seed=6)) != partition_path(options)


def test_natural_partition_round_trips_through_the_cache_file(tmp_path):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 20)
    spec = DataSpec(name="toy", kind="image",
                    train=Split(rng.integers(0, 255, (120, 1, 4, 4), dtype=np.uint8),
                                np.tile(np.arange(4), 30), groups),
                    num_classes=4, class_names=tuple("abcd"),
                    test=Split(rng.integers(0, 255, (16, 1, 4, 4), dtype=np.uint8),
                               np.tile(np.arange(4), 4)),
                    group_names=tuple(f"writer{i}" for i in range(6)), natural="sample")
    options = DataOptions(SourceOptions("toy"), 4, "natural", 1.0, 0.2, 0.25, 3)
    computed = federated._partition(spec, options)
    path = tmp_path / "p.npz"
    federated._write_partition(path, computed)
    read = federated._read_partition(path, spec)
    assert_same(read, computed)
    assert read.test is spec.test and read.local_test is spec.train
    assert len(read.client_groups) == 4 and all(g.startswith("writer") for g in read.client_groups)


def test_partition_statistics_do_not_depend_on_the_thread_count(cache_dir):
    """Whichever process partitions first (launcher, server, client) fixes the cached
    statistics for all, so they must be the same with 1 or 2 threads (float32 reductions
    otherwise differ in the last bits, which changed the embedded default's accuracies)."""
    options = DataOptions(SourceOptions("embedded-mnist"), 20, "dirichlet", 1.0, 0.2, 0.2, 0)
    spec = load_source(options.source)
    threads = torch.get_num_threads()
    try:
        stats = []
        for count in (1, 2):
            torch.set_num_threads(count)
            data = federated._partition(spec, options)
            stats.append((data.mean, data.std))
    finally:
        torch.set_num_threads(threads)
    assert stats[0] == stats[1]
    assert partition_path(options).name.startswith("partition-")


def test_cached_partition_file_is_readable_by_others(cache_dir):
    options = DataOptions(SourceOptions("embedded-mnist"), 4, "dirichlet", 1.0, 0.2, 0.2, 1)
    build_federated_data(options)
    assert partition_path(options).stat().st_mode & 0o777 == 0o644
