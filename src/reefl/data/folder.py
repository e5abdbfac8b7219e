"""The user's own data in the Hugging Face ``imagefolder`` / ``audiofolder`` layouts.

A folder holds one sub-folder per class (``cat/1.png``, ``dog/7.png``), optionally under
split folders (``train/cat/1.png``, ``test/cat/3.png``), and optionally a ``metadata.csv``
next to the files or split folders, with a ``file_name`` column (paths relative to the csv)
and extra columns: a label column that replaces the folder names, or a natural id for
``partition-by`` (``speaker_id``, ``writer_id``). Read here rather than through ``datasets``'
folder builders because those encode audio with ``torchcodec`` (not usable with the pinned
torch), and so that every error names the file or column at fault.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from reefl.data.decode import (
    check_classes,
    decode_audio,
    decode_images,
    group_codes,
    label_codes,
    missing_label,
)
from reefl.data.hub import Columns
from reefl.data.spec import DataError, DataSpec, Split

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3"})
SPLIT_NAMES = ("train", "test")
METADATA = "metadata.csv"
LINE = "\0line"  # a row's key for where its metadata came from ("<csv> line <n>")


def is_folder_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder of image or audio files (in any sub-folder)."""
    return path.is_dir() and any(_suffix_kind(p) for p in path.rglob("*") if p.is_file())


def read_folder(root: Path, columns: Columns, img_size: int, **spec_options: Any) -> DataSpec:
    """Read an imagefolder/audiofolder; split ``test`` when there is a test folder."""
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"{root} has a test folder but no train folder")
    if not split_dirs:
        split_dirs = {"train": root}
    notes: list[str] = []
    rows = {split: _rows(folder, root, notes) for split, folder in split_dirs.items()}
    kinds = {_suffix_kind(Path(r["file_name"])) for split_rows in rows.values()
             for r in split_rows}
    if len(kinds) != 1:
        raise DataError(f"{root} mixes image and audio files; keep one kind per data set")
    kind = kinds.pop()
    label_key = columns.label or "label"
    all_rows = [r for split_rows in rows.values() for r in split_rows]
    if any(label_key not in r for r in all_rows):
        missing = next(r for r in all_rows if label_key not in r)
        raise DataError(f"{root}: no label for {missing['file_name']} (column '{label_key}'"
                        " in metadata.csv, or a class folder)")
    for r in all_rows:
        if what := missing_label(r[label_key]):
            raise DataError(f"{r.get(LINE, root)}: column '{label_key}' holds {what} label "
                            f"{r[label_key]!r} for {r['file_name']}; every file needs a label "
                            "(fill or drop the row)")
    codes, class_names = label_codes([r[label_key] for r in all_rows], label_key)
    if columns.group and any(columns.group not in r for r in all_rows):
        raise DataError(f"{root}: no column '{columns.group}' (partition-by) in metadata.csv")
    groups, group_names = (group_codes([r[columns.group] for r in all_rows])
                           if columns.group else (None, ()))
    splits: dict[str, Split] = {}
    start = 0
    for split, split_rows in rows.items():
        stop = start + len(split_rows)
        paths = [r["path"] for r in split_rows]
        names = [str(p) for p in paths]
        inputs = (decode_images(paths, names, img_size) if kind == "image"
                  else decode_audio(paths, names))
        splits[split] = Split(inputs, codes[start:stop],
                              None if groups is None else groups[start:stop])
        start = stop
    check_classes(splits["train"].labels, root)
    return DataSpec(name=str(root), kind=kind, train=splits["train"], test=splits.get("test"),
                    num_classes=len(class_names), class_names=class_names,
                    group_names=group_names, notes=tuple(dict.fromkeys(notes)),
                    **spec_options)


def _rows(folder: Path, root: Path, notes: list[str]) -> list[dict[str, Any]]:
    """One dict per data file under ``folder``: ``path``, ``file_name``, ``label`` (its
    class folder, if it is in one) and the metadata.csv columns."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _suffix_kind(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder} holds no image or audio files")
    rows = {}
    for path in files:
        relative = path.relative_to(folder)
        row: dict[str, Any] = {"path": path, "file_name": str(relative)}
        if len(relative.parts) > 1:
            row["label"] = relative.parts[0]
        rows[path.resolve()] = row
    for csv_path in sorted({folder / METADATA, root / METADATA}):
        if csv_path.is_file():
            _merge_metadata(csv_path, rows, notes)
    return list(rows.values())


def _merge_metadata(csv_path: Path, rows: dict[Path, dict[str, Any]],
                    notes: list[str]) -> None:
    """Add metadata.csv's columns to the rows of the files it names (relative to it); a
    file named again replaces its earlier line, said in ``notes``."""
    seen: dict[Path, int] = {}
    duplicates: list[tuple[int, int]] = []
    with csv_path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if "file_name" not in (reader.fieldnames or []):
            raise DataError(f"{csv_path} has no 'file_name' column")
        for line, record in enumerate(reader, start=2):
            target = (csv_path.parent / record["file_name"]).resolve()
            if target in seen:
                duplicates.append((seen[target], line))
            seen[target] = line
            if target in rows:
                rows[target].update({k: v for k, v in record.items() if k != "file_name"})
                rows[target][LINE] = f"{csv_path} line {line}"
            elif not target.exists():
                raise DataError(f"{csv_path} line {line}: no file {record['file_name']}")
    if duplicates:
        first, again = duplicates[0]
        notes.append(f"{csv_path}: {len(duplicates)} lines name a file already named (e.g. "
                     f"line {again} repeats line {first}); each file's last line is used, "
                     "the earlier ones are dropped")


def _suffix_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else ""

