"""The files of a Flower app that ``flwr run`` packs into its FAB, copied into a folder of
their own, so that ``flwr run`` does not walk the app's virtual environment.

Flower 1.41's ``flwr run <dir>`` lists every file under ``<dir>`` (resolving each path)
before it filters them with the app's ``.gitignore`` and its own include/exclude patterns.
With the project's ``.venv/`` inside the app folder that is some 50,000 files and about 5 s
of CPU per run, before anything starts. Here the walk does not enter the folders that the
filter would drop whole, Flower's own filter then picks the files, and ``flwr run`` is
pointed at a copy of just those: the FAB holds the same files, byte for byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def app_files(app_dir: Path) -> dict[str, Path]:
    """The files Flower puts into the FAB of ``app_dir``: relative POSIX path -> file.

    A folder is skipped whole only when the ``.gitignore`` has no negated pattern (``!``)
    and the folder itself matches it or Flower's exclusions (``.venv/``, ``__pycache__``):
    then no file below it can pass Flower's filter. Symlinks are left out, as Flower does.
    """
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = app_dir.resolve()
    gitignore = load_gitignore_patterns(root / ".gitignore")
    prunable = [] if any(p.lstrip().startswith("!") for p in gitignore) else gitignore
    skip = build_pathspec([*prunable, *APP_PUBLISH_EXCLUDE_PATTERNS])
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        folder = Path(dirpath)
        relative = folder.relative_to(root)
        dirnames[:] = [d for d in dirnames
                       if not skip.match_file(f"{(relative / d).as_posix()}/")]
        for name in filenames:
            path = folder / name
            if not path.is_symlink():
                files[(relative / name).as_posix()] = path
    return {name: Path(path) for name, path in filter_paths_for_publish(files).items()}


def stage_app(app_dir: Path, destination: Path) -> Path:
    """Copy the FAB's files of ``app_dir`` (``app_files``) into ``destination`` (created;
    it must not exist yet) and return it, for ``flwr run destination``."""
    destination.mkdir(parents=True)
    for name, source in app_files(app_dir).items():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return destination
