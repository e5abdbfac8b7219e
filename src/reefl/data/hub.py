"""Hugging Face data sets, from the hub by name or from a ``save_to_disk`` folder, as arrays.

Columns are taken by name when given, else found by type: the one ``Image`` (or ``Audio``)
feature, the one ``ClassLabel`` (else a column called ``label``). Images and audio are read
with decoding off and decoded by ``reefl.data.decode`` (PIL, soundfile), which names the
example that fails and needs no ``torchcodec`` (the pinned ``datasets`` decodes audio with it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

from reefl.data.decode import (
    check_classes,
    check_labels,
    decode_audio,
    decode_images,
    group_codes,
    label_codes,
)
from reefl.data.spec import DataError, DataSpec, Split

HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Columns:
    """Which columns hold the input, the label and (optionally) the natural id."""

    image: str = ""
    audio: str = ""
    label: str = ""
    group: str = ""


def load_hub(repo: str, what_to_do: str) -> Any:
    """``datasets.load_dataset(repo)``: from the local Hugging Face cache when it is there,
    else downloaded. Offline and not cached: one-line DataError saying ``what_to_do``."""
    import datasets

    try:
        return _load_offline(repo)
    except (ConnectionError, FileNotFoundError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not _hub_reachable():
        raise DataError(f"{repo} is not in the Hugging Face cache and the hub cannot be "
                        f"reached (offline); {what_to_do}") from None
    try:
        return datasets.load_dataset(repo)
    except (ConnectionError, OSError) as err:
        raise DataError(f"{repo}: download failed ({str(err).splitlines()[0]}); "
                        f"{what_to_do}") from None


def _load_offline(repo: str) -> Any:
    """The data set from the Hugging Face cache only (fails fast when it is not there)."""
    import datasets

    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo)
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _hub_reachable() -> bool:
    """Whether the hub's host answers within HUB_TIMEOUT_S (a quick check before the
    ``datasets`` client's minute of retries)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def load_saved(path: str) -> Any:
    """A ``Dataset`` or ``DatasetDict`` written by ``save_to_disk``."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable save_to_disk folder "
                        f"({str(err).splitlines()[0]})") from None


def to_spec(loaded: Any, name: str, columns: Columns, img_size: int, where: str,
            **spec_options: Any) -> DataSpec:
    """A DataSpec from a loaded Dataset/DatasetDict: split ``train`` (or the only split) and,
    when present, ``test``."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    splits = dict(loaded)
    if "train" not in splits:
        if len(splits) != 1:
            raise DataError(f"{where}: no 'train' split among {', '.join(splits)}")
        splits = {"train": next(iter(splits.values()))}
    train = splits["train"]
    kind, input_column = _input_column(train, columns, where)
    label_column = _label_column(train, columns.label, where)
    if columns.group and columns.group not in train.column_names:
        raise DataError(f"{where}: no column '{columns.group}' (partition-by); columns: "
                        f"{', '.join(train.column_names)}")
    parts = {k: splits[k] for k in ("train", "test") if k in splits}
    for split_name, part in parts.items():  # before any column is read
        needed = [input_column, label_column] + ([columns.group] if columns.group else [])
        _require_columns(part, needed, f"{where} split '{split_name}'")
    labels_all = [list(parts[k][label_column]) for k in parts]
    codes, class_names = _classes(train, label_column, labels_all,
                                  [f"{where} split '{k}'" for k in parts])
    group_values = [list(parts[k][columns.group]) for k in parts] if columns.group else None
    group_names: tuple[str, ...] = ()
    if group_values is not None:
        flat, group_names = group_codes([g for part in group_values for g in part])
        bounds = np.cumsum([0] + [len(v) for v in group_values])
    result: dict[str, Split] = {}
    for i, (split_name, part) in enumerate(parts.items()):
        inputs = _decode(part, kind, input_column, img_size, f"{where} split '{split_name}'")
        groups = None if group_values is None else flat[bounds[i]:bounds[i + 1]]
        result[split_name] = Split(inputs, codes[i], groups)
    check_classes(result["train"].labels, where)
    return DataSpec(name=name, kind=kind, train=result["train"], test=result.get("test"),
                    num_classes=len(class_names), class_names=class_names,
                    group_names=group_names, **spec_options)


def _input_column(dataset: Any, columns: Columns, where: str) -> tuple[str, str]:
    """(kind, column) of the input: the given image/audio column, else the one of that type."""
    import datasets

    for kind, given in (("image", columns.image), ("audio", columns.audio)):
        if given:
            if given not in dataset.column_names:
                raise DataError(f"{where}: no column '{given}' ({kind}-column); columns: "
                                f"{', '.join(dataset.column_names)}")
            return kind, given
    found = [(kind, column) for column, feature in dataset.features.items()
             for kind, typ in (("image", datasets.Image), ("audio", datasets.Audio))
             if isinstance(feature, typ)]
    if len(found) != 1:
        what = "no" if not found else "several"
        raise DataError(f"{where}: {what} image or audio columns found by type "
                        f"({', '.join(c for _, c in found) or 'none'}); set image-column "
                        "or audio-column")
    return found[0]


def _label_column(dataset: Any, given: str, where: str) -> str:
    import datasets

    if given:
        if given not in dataset.column_names:
            raise DataError(f"{where}: no column '{given}' (label-column); columns: "
                            f"{', '.join(dataset.column_names)}")
        return given
    class_labels = [c for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    if "label" in dataset.column_names:
        return "label"
    raise DataError(f"{where}: cannot tell the label column (ClassLabel columns: "
                    f"{', '.join(class_labels) or 'none'}); set label-column")


def _classes(train: Any, column: str, values: list[list[Any]], wheres: list[str]
             ) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Per-split int64 codes and class names: a ClassLabel keeps its own numbering. A
    missing label (None, NaN, empty text, a ClassLabel's -1) is a DataError naming the split,
    the column and the row."""
    import datasets

    for part, where in zip(values, wheres, strict=True):
        check_labels(part, column, where)
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        codes = [np.asarray(v, dtype=np.int64) for v in values]
        for part, where in zip(codes, wheres, strict=True):
            if len(bad := np.flatnonzero((part < 0) | (part >= feature.num_classes))):
                raise DataError(f"{where} row {bad[0]}: column '{column}' holds class "
                                f"{part[bad[0]]}, not one of its {feature.num_classes} "
                                "(-1 is a missing label); every example needs a label")
        return codes, tuple(feature.names)
    flat_values = [v for part in values for v in part]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
           for v in flat_values):  # integer labels keep their numbers (FEMNIST's 0..61)
        count = int(max(flat_values)) + 1
        return ([np.asarray(v, dtype=np.int64) for v in values],
                tuple(str(i) for i in range(count)))
    flat, names = label_codes(flat_values, column)
    bounds = np.cumsum([0] + [len(v) for v in values])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], names


def _require_columns(dataset: Any, needed: list[str], where: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: no column '{missing[0]}'")


def _decode(dataset: Any, kind: str, column: str, img_size: int, where: str) -> np.ndarray:
    """Decode one split's input column with decoding off (raw bytes or paths)."""
    import datasets

    feature = datasets.Image(decode=False) if kind == "image" else datasets.Audio(decode=False)
    raw = dataset.cast_column(column, feature)[column]
    items = [r["bytes"] if r.get("bytes") else r.get("path") for r in raw]
    names = [f"{where} row {i}" + (f" ({r['path']})" if r.get("path") else "")
             for i, r in enumerate(raw)]
    if kind == "image":
        return decode_images(items, names, img_size)
    return decode_audio(items, names)
