"""Tests for reefl.data.partition and for build_federated_data on small hand-built sources.

Index-level functions are pinned on tiny hand examples whose outcome is forced; the
statistical properties (skew, following the drawn proportions) on pools large enough that
the bounds hold with a wide margin. The federated tests monkeypatch ``load_source`` so that
no file is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from reefl.data import federated
from reefl.data.federated import DataOptions, FederatedData, build_federated_data
from reefl.data.partition import (
    dirichlet_partition,
    draw_by_mix,
    equal_dirichlet_partition,
    natural_partition,
    select_groups,
    split_per_class,
    stratified_split,
)
from reefl.data.sources import SourceOptions
from reefl.data.spec import DataError, DataSpec, Split


def class_counts(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] example counts."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    """The parts' concatenation, checked to hold no index twice."""
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an example is in two parts"
    return joined


# -- equal_dirichlet_partition ------------------------------------------------------------


@pytest.mark.parametrize(("counts", "num_clients", "per_client", "left_out"), [
    ((101, 99, 100, 103, 100, 100, 100, 100, 100, 100), 7, 143, 2),  # 1003 = 7 * 143 + 2
    ((10,) * 10, 10, 10, 0),
    ((20, 19, 20), 6, 9, 5),  # 59 = 6 * 9 + 5
])
def test_equal_dirichlet_gives_equal_disjoint_shards(counts, num_clients, per_client, left_out):
    labels = np.repeat(np.arange(len(counts)), counts)
    shards, mixes = equal_dirichlet_partition(labels, num_clients, 0.5, seed=3)
    assert [len(s) for s in shards] == [per_client] * num_clients
    used = assert_disjoint(shards)
    assert len(labels) - len(used) == left_out < num_clients
    assert used.min() >= 0 and used.max() < len(labels)
    assert all(np.array_equal(s, np.sort(s)) for s in shards)
    assert mixes.shape == (num_clients, len(counts))
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0)


def test_equal_dirichlet_is_determined_by_the_seed():
    labels = np.repeat(np.arange(5), 40)
    first, mixes = equal_dirichlet_partition(labels, 4, 0.3, seed=1)
    again, mixes_again = equal_dirichlet_partition(labels, 4, 0.3, seed=1)
    other, mixes_other = equal_dirichlet_partition(labels, 4, 0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    np.testing.assert_array_equal(mixes, mixes_again)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.allclose(mixes, mixes_other)


def test_equal_dirichlet_small_alpha_skews_and_follows_the_drawn_proportions():
    # 1,000 examples of each of 10 classes and 10 clients of 1,000: the first client is
    # drawn before any class can run out, so its mix is a multinomial sample of its p_0.
    labels = np.repeat(np.arange(10), 1000)
    shards, mixes = equal_dirichlet_partition(labels, 10, 0.1, seed=0)
    shares = class_counts(labels, shards, 10) / 1000
    assert np.abs(shares[0] - mixes[0]).sum() < 0.1
    assert np.median(shares.max(axis=1)) > 0.45  # uniform would be 0.1
    assert np.median(mixes.max(axis=1)) > 0.45
    # every class is used up: together the clients hold the whole pool
    np.testing.assert_array_equal(class_counts(labels, shards, 10).sum(axis=0), [1000] * 10)


def test_equal_dirichlet_huge_alpha_is_close_to_uniform():
    labels = np.repeat(np.arange(10), 1000)
    shards, mixes = equal_dirichlet_partition(labels, 10, 1e5, seed=0)
    shares = class_counts(labels, shards, 10) / 1000
    np.testing.assert_allclose(mixes, 0.1, atol=0.01)
    # all but the last client are multinomial samples of ~uniform (sd ~0.01 per share);
    # the last one takes what is left, so it varies about 3x as much
    assert np.abs(shares[:-1] - 0.1).max() < 0.05
    assert np.abs(shares - 0.1).max() < 0.12


def test_equal_dirichlet_differs_from_flwr_per_class_dirichlet():
    """Same labels and alpha: flwr-datasets' per-class Dirichlet gives clients of very
    different sizes (and every example to someone); the paper's split gives equal ones."""
    labels = np.repeat(np.arange(10), 100)
    flwr = dirichlet_partition(labels, 7, 0.1, seed=0)
    equal, _ = equal_dirichlet_partition(labels, 7, 0.1, seed=0)
    flwr_sizes = [len(s) for s in flwr]
    assert sum(flwr_sizes) == 1000 and len(assert_disjoint(flwr)) == 1000
    assert max(flwr_sizes) - min(flwr_sizes) > 50
    assert [len(s) for s in equal] == [142] * 7  # 1000 // 7; 6 examples left out


# -- draw_by_mix ----------------------------------------------------------------------------


def test_draw_by_mix_redistributes_an_exhausted_class():
    # Both clients want only class 0, which has 3 examples: the first gets two of them, the
    # second the last one and then, class 0 being gone, one example of class 1.
    labels = np.array([0, 0, 0] + [1] * 10)
    mixes = np.array([[1.0, 0.0], [1.0, 0.0]])
    first, second = draw_by_mix(labels, mixes, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(labels[first], [0, 0])
    np.testing.assert_array_equal(labels[second], [0, 1])
    assert sorted(np.concatenate([first, second[:1]]).tolist()) == [0, 1, 2]


def test_draw_by_mix_falls_back_to_classes_outside_the_mix():
    # Client 0 wants class 1 only, which has 2 examples: it gets both and one of class 0.
    # Client 1 also wants class 1 only, but none is left: it gets class 0 alone.
    labels = np.array([0] * 5 + [1] * 2)
    mixes = np.array([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    shards = draw_by_mix(labels, mixes, 2, np.random.default_rng(1))
    assert [labels[s].tolist() for s in shards] == [[1, 1], [0, 0], [0, 0]]
    labels3 = np.array([0] * 5 + [1] * 2)
    first, second = draw_by_mix(labels3, mixes[:2], 3, np.random.default_rng(1))
    assert sorted(labels3[first].tolist()) == [0, 1, 1]
    assert labels3[second].tolist() == [0, 0, 0]
    assert len(assert_disjoint([first, second])) == 6


def test_draw_by_mix_rejects_more_than_the_pool():
    labels = np.array([0, 0, 0] + [1] * 10)
    with pytest.raises(ValueError, match="3 clients x 5 examples exceed the 13 available"):
        draw_by_mix(labels, np.full((3, 2), 0.5), 5, np.random.default_rng(0))


def test_draw_by_mix_counts_only_the_classes_of_the_mixes():
    labels = np.array([0, 0, 1, 1, 5, 5])  # class 5 is outside two-class mixes
    with pytest.raises(ValueError, match="2 clients x 3 examples exceed the 4 available"):
        draw_by_mix(labels, np.full((2, 2), 0.5), 3, np.random.default_rng(0))
    shards = draw_by_mix(labels, np.full((2, 2), 0.5), 2, np.random.default_rng(0))
    assert sorted(np.concatenate(shards).tolist()) == [0, 1, 2, 3]


def test_draw_by_mix_follows_the_mixes_when_the_pool_is_large():
    labels = np.repeat(np.arange(10), 1000)
    mixes = np.random.default_rng(7).dirichlet(np.full(10, 0.3), size=10)
    shards = draw_by_mix(labels, mixes, 200, np.random.default_rng(0))
    assert [len(s) for s in shards] == [200] * 10
    shares = class_counts(labels, shards, 10) / 200
    assert np.corrcoef(shares.ravel(), mixes.ravel())[0, 1] > 0.95
    assert np.abs(shares - mixes).sum(axis=1).max() < 0.35


# -- select_groups / natural_partition ------------------------------------------------------

# ids:   3  3  3  1  1  1  2  2  0  -1 -1 -1 -1  5  5  5    (sizes 0:1 1:3 2:2 3:3 5:3)
GROUPS = np.array([3, 3, 3, 1, 1, 1, 2, 2, 0, -1, -1, -1, -1, 5, 5, 5])


def test_select_largest_breaks_ties_by_id():
    assert select_groups(GROUPS, 2, "largest", seed=0).tolist() == [1, 3]  # 1, 3, 5 tie at 3
    assert select_groups(GROUPS, 3, "largest", seed=9).tolist() == [1, 3, 5]
    assert select_groups(GROUPS, 4, "largest", seed=0).tolist() == [1, 2, 3, 5]
    assert select_groups(GROUPS, 5, "largest", seed=0).tolist() == [0, 1, 2, 3, 5]


def test_select_sample_is_seeded_and_not_by_size():
    draws = [tuple(select_groups(GROUPS, 2, "sample", seed)) for seed in range(12)]
    assert draws[4] == tuple(select_groups(GROUPS, 2, "sample", 4))
    assert all(len(set(d)) == 2 and set(d) <= {0, 1, 2, 3, 5} and list(d) == sorted(d)
               for d in draws)
    assert len(set(draws)) > 3  # different seeds, different writers
    assert any(0 in d for d in draws)  # the smallest group is sampled too


def test_select_groups_rejects_more_clients_than_ids():
    # -1 is not a natural id: 5 ids, though 6 distinct values
    with pytest.raises(ValueError, match=r"num-clients=6 but the data has only 5 natural ids"):
        select_groups(GROUPS, 6, "largest", seed=0)
    with pytest.raises(ValueError, match="only 5"):
        select_groups(GROUPS, 6, "sample", seed=0)


def test_natural_partition_one_shard_per_chosen_id_and_loose_examples_dealt_out():
    shards = natural_partition(GROUPS, np.array([1, 3]), seed=0)
    assert len(shards) == 2
    loose = {9, 10, 11, 12}
    used = assert_disjoint(shards)
    assert set(shards[0].tolist()) - loose == {3, 4, 5}  # group 1
    assert set(shards[1].tolist()) - loose == {0, 1, 2}  # group 3
    assert set(used.tolist()) == {0, 1, 2, 3, 4, 5} | loose  # groups 0, 2, 5 unused
    assert all(np.array_equal(s, np.sort(s)) for s in shards)
    again = natural_partition(GROUPS, np.array([1, 3]), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_natural_partition_deals_loose_examples_uniformly():
    groups = np.array([0] * 5 + [1] * 5 + [2] * 5 + [-1] * 300)
    shards = natural_partition(groups, np.array([0, 2]), seed=4)
    loose_counts = [int((groups[s] < 0).sum()) for s in shards]
    assert sum(loose_counts) == 300
    assert all(110 < c < 190 for c in loose_counts)  # Binomial(300, 1/2): sd 8.7
    assert [int((groups[s] == g).sum()) for s, g in zip(shards, (0, 2), strict=True)] == [5, 5]
    assert not np.isin(np.flatnonzero(groups == 1), np.concatenate(shards)).any()


# -- split_per_class / stratified_split -------------------------------------------------------


def test_split_per_class_80_20_on_a_hand_example():
    labels = np.zeros(40, dtype=np.int64)
    shard = np.array([1, 4, 6, 9, 11, 13, 17, 20, 22, 25, 27, 30, 31, 33, 38])
    labels[shard[:10]] = 0
    labels[shard[10:]] = 1  # 10 of class 0, 5 of class 1
    labels[[0, 2, 3]] = 1  # outside the shard: must not count
    train, test = split_per_class(shard, labels, 0.2, np.random.default_rng(0))
    assert np.bincount(labels[test], minlength=2).tolist() == [2, 1]
    assert np.bincount(labels[train], minlength=2).tolist() == [8, 4]
    assert np.array_equal(np.sort(np.concatenate([train, test])), shard)
    assert len(assert_disjoint([train, test])) == 15
    assert np.array_equal(test, np.sort(test)) and np.array_equal(train, np.sort(train))


def test_split_per_class_takes_round_fraction_of_each_class():
    counts = [1, 2, 3, 4, 6, 7, 10, 13]
    labels = np.repeat(np.arange(len(counts)), counts)
    indices = np.arange(len(labels))
    train, test = split_per_class(indices, labels, 0.3, np.random.default_rng(5))
    # round(0.3 n): 0.3 0.6 0.9 1.2 1.8 2.1 3.0 3.9
    assert np.bincount(labels[test], minlength=8).tolist() == [0, 1, 1, 1, 2, 2, 3, 4]
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)


def test_split_per_class_keeps_a_one_example_class_in_train():
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    for fraction in (0.2, 0.6, 0.9):
        train, test = split_per_class(np.arange(8), labels, fraction, np.random.default_rng(0))
        assert 5 in train and 5 not in test
        assert set(np.unique(labels[train])) == {0, 1, 2}  # every class keeps a train example
    _, test = split_per_class(np.arange(8), labels, 0.0, np.random.default_rng(0))
    assert len(test) == 0


def test_stratified_split_takes_the_fraction_of_every_class():
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test]).tolist() == [2, 4, 1]
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(35))
    assert len(assert_disjoint([train, test])) == 35


# -- build_federated_data on hand-built sources ---------------------------------------------


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)


def _natural_source(with_test: bool, loose: int = 0) -> DataSpec:
    """Writers w0..w5 with 30, 25, 20, 15, 10, 5 examples; labels cycle 0, 1, 2 within each
    writer (w1: 9, 8, 8; w2: 7, 7, 6); ``loose`` examples with no writer at the end."""
    sizes = (30, 25, 20, 15, 10, 5)
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)] + [np.full(loose, -1)])
    labels = np.concatenate([np.arange(n) % 3 for n in sizes] + [np.arange(loose) % 3])
    test = Split(_images(12, 9), np.arange(12) % 3) if with_test else None
    return DataSpec(name="writers", kind="image", train=Split(_images(len(labels), 8), labels,
                                                              groups.astype(np.int32)),
                    num_classes=3, class_names=("a", "b", "c"), test=test,
                    group_names=tuple(f"w{g}" for g in range(6)), natural="largest")


SOURCES = {
    # 10 classes x 60, no test split
    "flat": DataSpec(name="flat", kind="image", train=Split(_images(600, 0),
                                                            np.repeat(np.arange(10), 60)),
                     num_classes=10, class_names=tuple("abcdefghij")),
    # 4 classes x 200 train, 4 x 50 test
    "with-test": DataSpec(name="with-test", kind="image",
                          train=Split(_images(800, 1), np.tile(np.arange(4), 200)),
                          test=Split(_images(200, 2), np.tile(np.arange(4), 50)),
                          num_classes=4, class_names=tuple("abcd")),
    # class 3 only in the test split
    "test-only-class": DataSpec(name="test-only-class", kind="image",
                                train=Split(_images(120, 3), np.tile(np.arange(3), 40)),
                                test=Split(_images(40, 4), np.tile(np.arange(4), 10)),
                                num_classes=4, class_names=tuple("abcd")),
    "writers": _natural_source(with_test=False),
    "writers-test": _natural_source(with_test=True),
    "writers-loose": _natural_source(with_test=False, loose=7),
}


@pytest.fixture
def sources(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``load_source`` returns SOURCES[dataset]; build_federated_data's cache is cleared and
    its on-disk cache not used (these sources have none; each build partitions afresh)."""
    monkeypatch.setattr(federated, "load_source", lambda options: SOURCES[options.dataset])
    monkeypatch.setattr(federated, "partition_path", lambda options: None)
    build_federated_data.cache_clear()
    yield
    build_federated_data.cache_clear()


def options(dataset: str, **changes: object) -> DataOptions:
    return replace(DataOptions(SourceOptions(dataset), num_clients=5, alpha=0.5, seed=0),
                   **changes)


def assert_same(a: FederatedData, b: FederatedData) -> None:
    for x, y in ((a.client_indices, b.client_indices),
                 (a.client_test_indices, b.client_test_indices)):
        assert all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    assert (a.mean, a.std) == (b.mean, b.std)


def test_dirichlet_with_stratified_test_split(sources):
    data = build_federated_data(options("flat"))
    spec = SOURCES["flat"]
    labels = spec.train.labels
    assert data.partitioner == "dirichlet"  # "auto" without natural ids
    assert data.test is spec.train and data.local_test is spec.train
    assert np.bincount(labels[data.test_indices]).tolist() == [12] * 10  # 0.2 * 60
    shards = assert_disjoint(data.client_indices)
    # the client shards and the global test set partition the 600 examples
    everything = assert_disjoint([shards, data.test_indices])
    assert np.array_equal(np.sort(everything), np.arange(600))
    # local tests: 120 // 5 each, from the global test set, disjoint
    assert [len(t) for t in data.client_test_indices] == [24] * 5
    assert np.isin(assert_disjoint(data.client_test_indices), data.test_indices).all()
    # statistics of the training pool (pixels in [0, 1])
    pool = np.asarray(spec.train.inputs[np.sort(shards)], dtype=np.float64) / 255
    assert data.mean[0] == pytest.approx(pool.mean(), abs=1e-5)
    assert data.std[0] == pytest.approx(pool.std(ddof=1), abs=1e-5)


def test_equal_dirichlet_with_a_source_test_split(sources):
    data = build_federated_data(options("with-test", num_clients=4, alpha=0.1,
                                        partitioner="equal-dirichlet"))
    spec = SOURCES["with-test"]
    assert data.partitioner == "equal-dirichlet"
    assert data.test is spec.test and data.local_test is spec.test
    np.testing.assert_array_equal(data.test_indices, np.arange(200))
    assert [len(s) for s in data.client_indices] == [200] * 4  # 800 // 4, the whole train
    assert np.array_equal(np.sort(assert_disjoint(data.client_indices)), np.arange(800))
    assert [len(t) for t in data.client_test_indices] == [50] * 4  # 200 // 4
    assert np.array_equal(np.sort(assert_disjoint(data.client_test_indices)), np.arange(200))
    # Client 0 is drawn first (no class can run out for it, 200 >= 200 and 50 >= 50): its
    # local test follows the same skewed mix as its training shard.
    train_mix = np.bincount(spec.train.labels[data.client_indices[0]], minlength=4) / 200
    test_mix = np.bincount(spec.test.labels[data.client_test_indices[0]], minlength=4) / 50
    assert train_mix.max() > 0.5  # alpha = 0.1: skewed
    assert np.abs(train_mix - test_mix).sum() < 0.4
    assert np.argmax(train_mix) == np.argmax(test_mix)


def test_equal_dirichlet_with_a_class_only_in_the_test_split(sources):
    data = build_federated_data(options("test-only-class", num_clients=4,
                                        partitioner="equal-dirichlet"))
    assert [len(s) for s in data.client_indices] == [30] * 4
    assert [len(t) for t in data.client_test_indices] == [10] * 4
    local = assert_disjoint(data.client_test_indices)
    assert np.array_equal(np.sort(local), np.arange(40))  # class 3 is dealt out too


def test_natural_without_test_split_uses_the_local_tests(sources):
    data = build_federated_data(options("writers", num_clients=3, local_test_fraction=0.2))
    spec = SOURCES["writers"]
    groups, labels = spec.train.groups, spec.train.labels
    assert data.partitioner == "natural"  # "auto" with natural ids
    assert data.client_groups == ("w0", "w1", "w2")  # the 3 largest writers
    for client, writer in enumerate((0, 1, 2)):
        own = np.concatenate([data.client_indices[client], data.client_test_indices[client]])
        assert np.array_equal(np.sort(own), np.flatnonzero(groups == writer))
    # round(0.2 n_c): w0 (10, 10, 10) -> 2, 2, 2; w1 (9, 8, 8) -> 2, 2, 2; w2 (7, 7, 6) -> 1, 1, 1
    assert [np.bincount(labels[t], minlength=3).tolist() for t in data.client_test_indices] \
        == [[2, 2, 2], [2, 2, 2], [1, 1, 1]]
    assert data.test is spec.train and data.local_test is spec.train
    np.testing.assert_array_equal(data.test_indices, np.sort(np.concatenate(
        data.client_test_indices)))
    used = assert_disjoint([*data.client_indices, data.test_indices])
    assert np.array_equal(np.sort(used), np.flatnonzero(groups <= 2))  # w3..w5 unused


def test_natural_with_test_split_keeps_the_source_test(sources):
    data = build_federated_data(options("writers-test", num_clients=2))
    spec = SOURCES["writers-test"]
    assert data.test is spec.test and data.local_test is spec.train
    np.testing.assert_array_equal(data.test_indices, np.arange(12))
    assert data.client_groups == ("w0", "w1")
    used = assert_disjoint([*data.client_indices, *data.client_test_indices])
    assert np.array_equal(np.sort(used), np.flatnonzero(spec.train.groups <= 1))


def test_natural_deals_examples_without_a_writer_to_clients(sources):
    data = build_federated_data(options("writers-loose", num_clients=3))
    groups = SOURCES["writers-loose"].train.groups
    used = assert_disjoint([*data.client_indices, data.test_indices])
    expected = np.flatnonzero(groups <= 2)  # w0..w2 and the 7 loose ones (-1)
    assert np.array_equal(np.sort(used), expected) and (groups[expected] == -1).sum() == 7


def test_natural_with_too_few_writers_is_a_data_error(sources):
    with pytest.raises(DataError, match="writers: num-clients=7 but the data has only 6"):
        build_federated_data(options("writers", num_clients=7))
    with pytest.raises(DataError, match="needs natural ids, and flat has none"):
        build_federated_data(options("flat", partitioner="natural"))


@pytest.mark.parametrize(("dataset", "partitioner"), [
    ("flat", "dirichlet"), ("with-test", "equal-dirichlet"), ("writers", "natural")])
def test_same_options_same_federated_data(sources, dataset, partitioner):
    chosen = options(dataset, partitioner=partitioner, num_clients=3)
    first = build_federated_data(chosen)
    build_federated_data.cache_clear()
    again = build_federated_data(chosen)
    assert first is not again
    assert_same(first, again)
    other = build_federated_data(replace(chosen, seed=1))
    assert not all(np.array_equal(p, q) for p, q in zip(
        first.client_indices + first.client_test_indices,
        other.client_indices + other.client_test_indices, strict=True))
