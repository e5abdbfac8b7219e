"""Preset run configs: TOML files of run-config keys, one per experiment of the paper.

A preset may start from others with ``base = "name"`` (or a list of names, merged in order;
a name is a preset of this folder or a path relative to the file), then sets its own keys on
top. ``reefl run --preset NAME`` applies one before the command line's own ``-c`` values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent
BASE_KEY = "base"


class PresetError(ValueError):
    """A preset that cannot be read; the message is one line naming the file or name."""


def preset_names() -> list[str]:
    """Every preset of this folder, by name (file name without ``.toml``)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of preset ``name``."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise PresetError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    return path


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The flat run-config keys of a TOML file, its ``base`` presets resolved first."""
    from flwr.common.config import flatten_dict

    path = path.expanduser().resolve()
    if path in seen:
        raise PresetError(f"{path}: 'base' loops back to itself")
    try:
        with path.open("rb") as stream:
            loaded = tomllib.load(stream)
    except FileNotFoundError:
        raise PresetError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"{path} is not valid TOML: {err}") from None
    bases = loaded.pop(BASE_KEY, [])
    try:
        values = flatten_dict(loaded)
    except ValueError as err:
        raise PresetError(f"{path}: {err}") from None
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        local = path.parent / f"{base}.toml"
        base_path = local if local.is_file() else preset_path(str(base))
        merged.update(read_config_file(base_path, (*seen, path)))
    return {**merged, **values}
