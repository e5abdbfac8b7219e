"""Tests for reefl.data: the embedded source, splits, partitions, loaders and transforms."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reefl.config import ConfigError, RunConfig
from reefl.data import (
    DATA_SOURCES,
    DataError,
    DataOptions,
    SourceOptions,
    build_federated_data,
    client_loader,
    input_pipeline,
    load_source,
    normalize,
    random_translate,
)
from reefl.data import (
    test_loader as global_test_loader,  # renamed so pytest does not collect it
)
from reefl.data.federated import FederatedData, InputPipeline
from reefl.data.partition import dirichlet_partition
from reefl.data.spec import DataSpec, Split

SOURCE = "embedded-mnist"
NUM_CLIENTS = 20
OPTIONS = DataOptions(SourceOptions(SOURCE), NUM_CLIENTS, "auto", 0.1, 0.2, 0.2, 0)


def build(alpha: float = 0.1, seed: int = 0) -> FederatedData:
    """The embedded source over NUM_CLIENTS clients with a 20% test split (cached)."""
    return build_federated_data(replace(OPTIONS, alpha=alpha, seed=seed))


def plain(data: FederatedData, augment: bool = False) -> InputPipeline:
    """The embedded run's pipeline: no pretrained backbone, stored size."""
    return input_pipeline(data, 28, pretrained=False, augment=augment)


def train_pool(data: FederatedData) -> Split:
    """The examples clients train on (every training index not in the test set)."""
    pool = np.setdiff1d(np.arange(len(data.train)), data.test_indices)
    return Split(np.asarray(data.train.inputs[pool]), np.asarray(data.train.labels[pool]))


def global_test(data: FederatedData) -> Split:
    return Split(np.asarray(data.test.inputs[data.test_indices]),
                 np.asarray(data.test.labels[data.test_indices]))


def skew(alpha: float) -> tuple[float, float]:
    """Mean total-variation distance of client label distributions from uniform, and the median
    share of a client's most common label."""
    data = build(alpha)
    labels = np.asarray(data.train.labels)
    counts = np.stack([np.bincount(labels[idx], minlength=10) for idx in data.client_indices])
    shares = counts / counts.sum(axis=1, keepdims=True)
    return 0.5 * np.abs(shares - 0.1).sum(axis=1).mean(), np.median(shares.max(axis=1))


def examples(split: Split) -> list[bytes]:
    """Each example (pixels and label) as bytes, sorted: a multiset that ignores order."""
    rows = np.concatenate([split.inputs.reshape(len(split), -1),
                           split.labels[:, None].astype(np.uint8)], axis=1)
    return sorted(map(bytes, rows))


def one_epoch(data: FederatedData, seed: int) -> list[torch.Tensor]:
    """All image and label batches of client 0's augmented loader, in order."""
    return [tensor for batch in client_loader(data, plain(data, augment=True), 0, 16, seed)
            for tensor in batch]


def test_embedded_source_shapes_and_dtypes():
    source = load_source(SourceOptions(SOURCE))
    assert SOURCE in DATA_SOURCES
    images = source.train.inputs
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert source.train.labels.shape == (5000,) and source.train.labels.dtype == np.int64
    assert source.num_classes == 10 and source.kind == "image" and source.test is None
    assert np.unique(source.train.labels).tolist() == list(range(10))
    assert images.max() == 255


def test_unknown_source_names_the_allowed_ones():
    with pytest.raises(DataError, match=SOURCE):
        load_source(SourceOptions("no-such-data"))


def test_test_split_is_stratified_and_complements_the_train_pool():
    data = build()
    test, pool = global_test(data), train_pool(data)
    assert len(test) == 1000 and len(pool) == 4000
    assert np.bincount(test.labels).tolist() == [100] * 10
    # Every source example lands in exactly one of train/test: compare multisets of examples.
    source = load_source(SourceOptions(SOURCE)).train
    assert sorted(examples(pool) + examples(test)) == examples(source)


def test_client_partitions_are_disjoint_and_cover_the_pool():
    data = build()
    assert len(data.client_indices) == NUM_CLIENTS
    merged = np.concatenate(data.client_indices)
    pool = np.setdiff1d(np.arange(len(data.train)), data.test_indices)
    assert np.array_equal(np.sort(merged), pool)
    assert min(len(idx) for idx in data.client_indices) >= 10


def test_small_alpha_skews_labels():
    (skewed_distance, top_share), (iid_distance, _) = skew(0.1), skew(1000.0)
    assert skewed_distance > 0.5 and iid_distance < 0.05
    assert top_share > 0.4  # the typical client is dominated by one class


def test_partition_is_determined_by_the_seed():
    build_uncached = build_federated_data.__wrapped__
    first, again, other = (build_uncached(replace(OPTIONS, alpha=0.5, seed=s))
                           for s in (1, 1, 2))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(first.client_indices, again.client_indices, strict=True)
    )
    assert np.array_equal(first.test_indices, again.test_indices)
    assert not np.array_equal(first.test_indices, other.test_indices)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b)
        for a, b in zip(first.client_indices, other.client_indices, strict=True)
    )


def test_unsatisfiable_minimum_falls_back_then_fails_clearly():
    labels = np.repeat(np.arange(10), 400)
    with pytest.warns(UserWarning, match="falling back to a minimum of 1"):
        shards = dirichlet_partition(labels, NUM_CLIENTS, alpha=0.05, seed=1)
    assert min(map(len, shards)) >= 1 and sum(map(len, shards)) == len(labels)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="raise alpha"):
        dirichlet_partition(labels, NUM_CLIENTS, alpha=0.001, seed=0)


def test_normalisation_statistics_standardise_the_pool():
    data = build()
    pixels = normalize(torch.from_numpy(train_pool(data).inputs), data.mean, data.std)
    assert pixels.dtype == torch.float32
    assert abs(pixels.mean().item()) < 1e-4 and abs(pixels.std().item() - 1) < 1e-4


def test_client_loader_yields_normalised_shard():
    data = build()
    shard_labels = data.train.labels[data.client_indices[3]]
    batches = list(client_loader(data, plain(data), 3, batch_size=32, seed=0))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28)
    assert batches[0][0].shape[0] == min(32, len(shard_labels))
    assert sorted(labels.tolist()) == sorted(shard_labels.tolist())
    background = (0 - data.mean[0] * 255) / (data.std[0] * 255)
    assert images.min().item() == pytest.approx(background, abs=1e-5)


def test_client_loader_is_reproducible_from_the_seed():
    data = build()
    first, again, other = one_epoch(data, 7), one_epoch(data, 7), one_epoch(data, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_test_loader_keeps_order_without_augmentation():
    data = build()
    batches = list(global_test_loader(data, plain(data), batch_size=128))
    test = global_test(data)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(test.labels))
    assert torch.equal(torch.cat([b[0] for b in batches]),
                       normalize(torch.from_numpy(test.inputs), data.mean, data.std))


def test_random_translate_moves_a_pixel_by_at_most_max_shift():
    batch = torch.zeros(300, 1, 9, 9, dtype=torch.uint8)
    batch[:, :, 4, 4] = 200
    moved = random_translate(batch, 2, torch.Generator().manual_seed(0))
    assert moved.dtype == torch.uint8 and moved.shape == batch.shape
    # Mass is kept: a centred pixel shifted by at most 2 cannot leave a 9x9 frame.
    assert torch.equal(moved.flatten(1).sum(1), batch.flatten(1).sum(1))
    positions = (moved[:, 0] == 200).flatten(1).nonzero()[:, 1]
    rows, cols = positions // 9, positions % 9
    assert len(positions) == 300 and (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 25  # all of [-2, 2]^2 occur


def test_random_translate_is_reproducible_and_zero_shift_is_identity():
    batch = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    shifted = [random_translate(batch, 1, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*shifted)
    assert torch.equal(random_translate(batch, 0, torch.Generator()), batch)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_the_real_fashion_mnist_from_debian(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("REEFL_FASHION_MNIST_DIR", raising=False)
    load_source.cache_clear()
    spec = load_source(SourceOptions("fashion-mnist"))
    load_source.cache_clear()
    assert spec.train.inputs.shape == (60000, 1, 28, 28) and spec.test.inputs.shape[0] == 10000
    assert np.bincount(spec.train.labels).tolist() == [6000] * 10
    assert np.bincount(spec.test.labels).tolist() == [1000] * 10
    assert spec.class_names[9] == "ankle boot" and spec.train.inputs.max() == 255


def test_crop_boxes_stay_inside_and_cover_the_scale_range():
    from reefl.data.transforms import crop_box

    generator = torch.Generator().manual_seed(0)
    boxes = [crop_box(32, 40, (0.08, 1.0), generator) for _ in range(400)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 40 and h > 0 and w > 0
    areas = np.array([h * w / (32 * 40) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert areas.min() < 0.15 and areas.max() > 0.85  # the whole (0.08, 1) range is drawn
    assert ratios.min() >= 0.6 and ratios.max() <= 1.6  # 3/4..4/3 up to rounding
    # a scale no box can meet falls back to the largest central box within the ratios
    assert crop_box(10, 100, (2.0, 2.0), generator) == (0, 43, 10, 13)


def test_random_resized_crop_of_a_constant_image_is_constant_at_the_new_size():
    from reefl.data.transforms import random_resized_crop

    batch = torch.full((5, 3, 32, 32), 7.0)
    out = random_resized_crop(batch, 24, (0.08, 1.0), torch.Generator().manual_seed(1))
    assert out.shape == (5, 3, 24, 24) and torch.allclose(out, torch.full_like(out, 7.0))


def test_random_flip_mirrors_about_half_of_the_images():
    from reefl.data.transforms import random_flip

    batch = torch.arange(400 * 3, dtype=torch.float32).view(400, 1, 1, 3)
    out = random_flip(batch, torch.Generator().manual_seed(2))
    flipped = (out == batch.flip(-1)).all(dim=-1).flatten()
    assert ((out == batch).all(dim=-1).flatten() | flipped).all()
    assert 150 < flipped.sum().item() < 250


def test_resize_keeps_a_batch_of_the_right_size_and_averages_when_shrinking():
    from reefl.data.transforms import resize

    batch = torch.rand(2, 1, 8, 8)
    assert resize(batch, 8) is batch
    checker = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(4, 4).view(1, 1, 8, 8)
    small = resize(checker, 4)
    assert small.shape == (1, 1, 4, 4) and torch.allclose(small[..., 1:3, 1:3],
                                                          torch.full((1, 1, 2, 2), 0.5))
    assert (small - 0.5).abs().max() < 0.02  # edges: the filter's border weights


def test_pretrained_pipeline_repeats_grey_on_three_channels_with_imagenet_stats():
    data = build()
    pipeline = input_pipeline(data, 14, pretrained=True, augment=False)
    stored = torch.from_numpy(np.array(data.train.inputs[:4]))
    out = pipeline(stored, None)
    assert out.shape == (4, 3, 14, 14) and pipeline.channels == 3
    grey = torch.nn.functional.interpolate(stored.float() / 255, size=(14, 14), mode="bilinear",
                                           antialias=True)
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                        strict=True)):
        torch.testing.assert_close(out[:, c], ((grey - mean) / std)[:, 0], atol=1e-5, rtol=0)


def test_crop_pipeline_trains_on_crops_and_evaluates_on_resized_images():
    split = Split(np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8),
                  np.arange(6) % 2)
    spec = DataSpec("tiny", "image", split, 2, ("a", "b"), crop_scale=(0.5, 1.0))
    data = FederatedData(spec, split, np.arange(6), [np.arange(6)], split,
                         [np.arange(6)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "dirichlet")
    pipeline = input_pipeline(data, 16, pretrained=False, augment=True)
    stored = torch.from_numpy(split.inputs)
    train = pipeline(stored, torch.Generator().manual_seed(0))
    again = pipeline(stored, torch.Generator().manual_seed(0))
    plain_eval = pipeline(stored, None)
    assert train.shape == plain_eval.shape == (6, 3, 16, 16) and torch.equal(train, again)
    assert not torch.allclose(train, plain_eval)
    expected = (torch.nn.functional.interpolate(stored.float() / 255, size=(16, 16),
                                                mode="bilinear", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(plain_eval, expected, atol=1e-5, rtol=0)


def test_train_and_test_examples_sample_the_pool_and_the_test_set() -> None:
    full = build()
    small = build_federated_data(replace(OPTIONS, alpha=0.1, train_examples=400,
                                         test_examples=150))
    shards = np.concatenate(small.client_indices)
    assert len(small.test_indices) == 150 and set(small.test_indices) <= set(full.test_indices)
    pool = set(range(len(full.train))) - set(full.test_indices)  # the training pool
    assert len(shards) <= 400 and set(shards) <= pool
    assert np.array_equal(small.test_indices, np.sort(small.test_indices))
    again = build_federated_data(replace(OPTIONS, alpha=0.1, train_examples=400,
                                         test_examples=150))
    assert np.array_equal(again.test_indices, small.test_indices)  # seeded
    with pytest.raises(ConfigError, match="^train-examples must be an integer >= 0"):
        RunConfig.from_flat({"train-examples": -1})
