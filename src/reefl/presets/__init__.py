"""Preset run configs: TOML files of run-config keys, one per experiment of the paper.

A preset may start from others with ``base = "name"`` (or a list of names, merged in order;
a name is a preset of this folder or a path relative to the file), then sets its own keys on
top. ``reefl run --preset NAME`` applies one before the command line's own ``-c`` values.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent
BASE_KEY = "base"


class PresetError(ValueError):
    """A preset that cannot be read; the message is one line naming the file or name."""


class PresetValueError(PresetError):
    """A value in a config file that is no TOML value: the message starts with its key,
    as a validation error does, and ends with the file and line."""


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
        text = path.read_bytes().decode("utf-8")
        loaded = tomllib.loads(text)
    except FileNotFoundError:
        raise PresetError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise PresetError(f"{path} is not valid TOML: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise _decode_error(path, text, err) from None
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


_LINE_NUMBER = re.compile(r"at line (\d+)")
_KEY_VALUE_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=\s*(\S.*?)\s*")


def _decode_error(path: Path, text: str, err: tomllib.TOMLDecodeError) -> PresetError:
    """The error for a file that is not TOML: when the line TOML stops at is one
    ``key = value`` whose value is no TOML value, the key's own one-line message
    (``reefl.config.unparsed_value_problem``) with the file and line; else TOML's."""
    from reefl.config import unparsed_value_problem

    found = _LINE_NUMBER.search(str(err))
    lines = text.splitlines()
    if found and 0 < int(found.group(1)) <= len(lines):
        number = int(found.group(1))
        pair = _KEY_VALUE_LINE.fullmatch(lines[number - 1])
        if pair:
            key, value = pair.groups()
            try:
                tomllib.loads(f"{key} = {value}")
            except tomllib.TOMLDecodeError:
                return PresetValueError(f"{unparsed_value_problem(key, value)} "
                                        f"({path}, line {number})")
    return PresetError(f"{path} is not valid TOML: {err}")
