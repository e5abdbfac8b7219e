"""The on-disk data cache: a source decoded (and featurised) once per machine, then
memory-mapped by every process of every run.

A cached set is a folder of ``.npy`` arrays plus ``meta.json``. It is written into a temporary
folder and renamed into place, so an interrupted write never looks complete and two processes
filling the same entry at once both end with a whole one. Memory-mapped arrays are shared
through the page cache: twenty client processes reading CIFAR-100 hold one copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reefl.data.spec import DataSpec, Split
from reefl.outputs.files import atomic_write

FORMAT_VERSION = 1
_ARRAYS = ("inputs", "labels", "groups")


def cache_root() -> Path:
    """``$REEFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/reefl``, else ``~/.cache/reefl``."""
    if root := os.environ.get("REEFL_CACHE_DIR"):
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "reefl"


def entry_name(*parts: object) -> str:
    """A readable, filesystem-safe cache folder name for a source and its options."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, *map(str, parts)]).encode())
    head = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(parts[0]))[:40]
    return f"{head}-{digest.hexdigest()[:12]}"


def cached(name: str, build: Callable[[], DataSpec]) -> DataSpec:
    """The cache entry ``name`` memory-mapped; built with ``build`` and written first if it
    is not there yet."""
    path = cache_root() / "data" / name
    if not (path / "meta.json").is_file():
        write(path, build())
    return read(path)


def write(path: Path, spec: DataSpec) -> None:
    """Write ``spec`` to ``path`` atomically (temporary folder, then rename). A folder
    without meta.json is never a whole entry (an interrupted removal leaves one): it is
    replaced; if another process wrote the entry meanwhile, its entry is kept."""
    if path.is_dir() and not (path / "meta.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
    try:
        with atomic_write(path, directory=True) as tmp:
            _write_arrays(tmp, spec)
    except OSError:
        if not (path / "meta.json").is_file():
            raise


def _write_arrays(folder: Path, spec: DataSpec) -> None:
    """``spec``'s arrays as .npy files and its description as meta.json in ``folder``."""
    splits = {"train": spec.train} | ({"test": spec.test} if spec.test is not None else {})
    for split_name, split in splits.items():
        for array_name in _ARRAYS:
            array = getattr(split, array_name)
            if array is not None:
                np.save(folder / f"{split_name}-{array_name}.npy", np.ascontiguousarray(array))
    if spec.noise is not None:
        np.save(folder / "noise.npy", np.ascontiguousarray(spec.noise))
    (folder / "meta.json").write_text(json.dumps(_meta(spec, list(splits)), indent=1))


def read(path: Path) -> DataSpec:
    """The cached set at ``path``, its arrays memory-mapped read-only."""
    meta = json.loads((path / "meta.json").read_text())

    def load(name: str) -> np.ndarray | None:
        file = path / f"{name}.npy"
        return np.load(file, mmap_mode="r") if file.is_file() else None

    def split(name: str) -> Split:
        return Split(*(load(f"{name}-{a}") for a in _ARRAYS))

    return DataSpec(
        name=meta["name"], kind=meta["kind"], train=split("train"),
        num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]),
        test=split("test") if "test" in meta["splits"] else None,
        group_names=tuple(meta["group_names"]), natural=meta["natural"],
        augmentation=meta["augmentation"], crop_scale=tuple(meta["crop_scale"]),
        flip=meta["flip"], noise=load("noise"), notes=tuple(meta.get("notes", ())),
    )  # fmt: skip


def _meta(spec: DataSpec, splits: list[str]) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION, "name": spec.name, "kind": spec.kind, "splits": splits,
        "num_classes": spec.num_classes, "class_names": list(spec.class_names),
        "group_names": list(spec.group_names), "natural": spec.natural,
        "augmentation": spec.augmentation, "crop_scale": list(spec.crop_scale),
        "flip": spec.flip, "notes": list(spec.notes),
    }  # fmt: skip
