"""How reefl writes files: never half-written (``atomic_write``), with the mode a plain
``open()`` would give them (``as_if_opened``).

``tempfile.mkstemp`` (and ``NamedTemporaryFile``), ``tempfile.mkdtemp`` and safetensors'
``save_file`` (which writes a temporary file and renames it) create 0600 files and 0700
folders: private, unlike everything else in a run folder or in reefl's cache, which is
shared with the user's other tools (and, for the cache, with other users' runs). So such a
file gets the mode that ``open()`` / ``mkdir()`` would have given it: 0666 / 0777 less the
process umask (0644 / 0755 under the usual 022) - never more than the user allows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UMASK_LOCK = threading.Lock()
PARTIAL = ".partial"  # the name of a temporary file or folder of atomic_write ends so


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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: Path, *, directory: bool = False, durable: bool = False
                 ) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an empty file, or with ``directory`` an empty
    folder) for the caller to fill; when the block ends without error it gets the mode of a
    plain ``open()``/``mkdir()`` and is renamed to ``path``, else it is removed. So ``path``
    is either the old content or the whole new one, never half written, and nothing is left
    behind. ``durable``: the file and then its folder are fsynced, so the rename is on disk
    before anything that relies on it (e.g. deleting an older checkpoint). Renaming a folder
    onto an existing one fails (OSError): the caller decides what that means."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL, dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL, dir=path.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        if durable and not directory:
            _fsync(tmp)
        as_if_opened(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def write_atomically(path: Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors at ``path`` through ``atomic_write(durable=True)``:
    never half written, on disk before anything relies on it, with a plain file's mode
    (safetensors itself writes 0600 files)."""
    import torch
    from safetensors.torch import save_file

    # contiguous clones: states may hold views of one storage (LoRA's merged weights), which
    # safetensors refuses to save as separate names
    with atomic_write(path, durable=True) as partial:
        save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                   for k, v in tensors.items()}, str(partial), metadata=metadata)
