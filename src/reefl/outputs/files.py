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
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

_UMASK_LOCK = threading.Lock()
PARTIAL = ".partial"  # the name of a temporary file or folder of atomic_write ends so
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
"""The temporary file safetensors' ``save_file`` writes beside its target (Rust tempfile's
``.tmpXXXXXX``) and renames; a crash inside the write leaves it."""
DIGEST_KEY = "reefl-sha256"
"""The safetensors metadata key of the file's own digest (``write_atomically``)."""
_PLACEHOLDER = "0" * 64


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
                     metadata: dict[str, str] | None = None) -> str:
    """Save ``tensors`` as safetensors at ``path`` through ``atomic_write(durable=True)``:
    never half written, on disk before anything relies on it, with a plain file's mode
    (safetensors itself writes 0600 files). The file carries its own digest in its metadata
    (``DIGEST_KEY``, see ``content_digest``), so ``verify_safetensors`` finds any changed
    byte; returns that digest."""
    import torch
    from safetensors.torch import save_file

    # contiguous clones: states may hold views of one storage (LoRA's merged weights), which
    # safetensors refuses to save as separate names
    with atomic_write(path, durable=True) as partial:
        save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                   for k, v in tensors.items()}, str(partial),
                  metadata={**(metadata or {}), DIGEST_KEY: _PLACEHOLDER})
        return _seal(partial)


class DamagedFile(Exception):
    """A file that is not what was written (one line: what is wrong)."""


def sha256_file(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(stream: BinaryIO, size: int) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's parsed header and its bytes, its structure checked against the
    file's ``size``: DamagedFile if it is truncated, padded or cannot be parsed."""
    start = stream.read(8)
    if len(start) < 8:
        raise DamagedFile(f"truncated ({size} bytes)")
    length = int.from_bytes(start, "little")
    if length > size - 8:
        raise DamagedFile(f"truncated or damaged header ({size} bytes, header of {length})")
    raw = stream.read(length)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items()
                if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise DamagedFile("damaged header (not a safetensors file)") from None
    data = size - 8 - length
    if max(ends, default=0) != data:
        what = "truncated" if max(ends, default=0) > data else "damaged (bytes past its data)"
        raise DamagedFile(f"{what}: {data} bytes of tensor data, its header says "
                          f"{max(ends, default=0)}")
    return header, raw


def content_digest(stream: BinaryIO, header: dict[str, Any]) -> str:
    """The digest a safetensors file made by ``write_atomically`` carries: the SHA-256 of
    its header (as sorted compact JSON, without ``DIGEST_KEY``) and then its tensor data,
    read from ``stream``'s position (just past the header) to the end."""
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != DIGEST_KEY}
    digest = hashlib.sha256(json.dumps({**header, "__metadata__": metadata}, sort_keys=True,
                                       separators=(",", ":")).encode())
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _seal(path: Path) -> str:
    """Write the digest of the safetensors file at ``path`` over its placeholder (same
    length, so nothing moves); returns it."""
    with open(path, "r+b") as stream:
        header, raw = _read_header(stream, os.path.getsize(path))
        digest = content_digest(stream, header)
        marker = f'"{DIGEST_KEY}":"{_PLACEHOLDER}"'.encode()
        at = raw.find(marker)
        if at < 0 or raw.find(marker, at + 1) >= 0:
            raise RuntimeError(f"{path}: the digest placeholder is not in its header once")
        stream.seek(8 + at + len(marker) - 65)
        stream.write(digest.encode())
    return digest


def verify_safetensors(path: Path) -> tuple[dict[str, str], str]:
    """Check a safetensors file without loading it: its structure (not truncated, a header
    that parses) and, if it carries one (``write_atomically``), its digest. Returns its
    metadata and its ``content_digest`` (defined for any safetensors file: compare it with
    one recorded elsewhere); DamagedFile (one line, without the path) if anything is wrong.
    A file that should carry a digest but does not (a flipped bit in ``DIGEST_KEY``) is the
    caller's to refuse."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as stream:
            header, _ = _read_header(stream, size)
            metadata = header.get("__metadata__") or {}
            digest = content_digest(stream, header)
    except OSError as err:
        raise DamagedFile(f"cannot be read ({err.strerror or err})") from None
    if not isinstance(metadata, dict):
        raise DamagedFile("damaged header (its metadata is no mapping)")
    recorded = metadata.get(DIGEST_KEY)
    if recorded is not None and digest != recorded:
        raise DamagedFile("its content does not match the digest it was written with (it "
                          "changed after it was written)")
    return dict(metadata), digest


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files and folders that a write killed half way leaves in
    ``folder`` (``atomic_write``'s ``.<name>.<random>.partial``, safetensors'
    ``.tmpXXXXXX``); returns them. Only for a folder no process writes into any more."""
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (entry.name.startswith(".") and entry.name.endswith(PARTIAL)) or \
                SAFETENSORS_TMP.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
