"""The mode of what reefl writes through a temporary file or folder.

``tempfile.mkstemp`` (and ``NamedTemporaryFile``), ``tempfile.mkdtemp`` and safetensors'
``save_file`` (which writes a temporary file and renames it) create 0600 files and 0700
folders: private, unlike everything else in a run folder or in reefl's cache, which is
shared with the user's other tools (and, for the cache, with other users' runs). So such a
file gets the mode that ``open()`` / ``mkdir()`` would have given it: 0666 / 0777 less the
process umask (0644 / 0755 under the usual 022) - never more than the user allows.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Read from /proc where Linux shows it; elsewhere ``os.umask`` (which
    only reads by setting) is set and put back at once, under a lock so that two threads of
    ours never see the other's placeholder."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What ``open()`` (or ``mkdir()``, for a ``directory``) gives a new file under the
    current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def as_if_opened(path: Path | str) -> None:
    """Give ``path`` (a file, or a folder) the mode ``default_mode`` says: call it on a
    temporary file or folder before renaming it into place, or right after a library
    wrote it through one."""
    os.chmod(path, default_mode(Path(path).is_dir()))
