"""The per-client method state that lives on the server (FedDyn's g_i), one file per client.

The server sends each sampled client its state with the training message and keeps the
state the client sends back. Held in RAM, these states would grow with every client that
ever trained, and saving them with the checkpoint would rewrite all of them after every
round. Instead each lives in a file of its own, ``<run_dir>/client-states/<partition
id>.r<round>.safetensors`` (the state the client returned in that round), written atomically
when the state arrives; RAM holds only the index, partition id -> round of its latest file,
and a round writes only the files of the clients that trained in it.

Exact resume: the checkpoint saves the index, not the tensors (``Checkpoint.client_rounds``).
A newer state is a new file (its round is in the name), so the files the last checkpoint
names stay as they are until the next checkpoint is saved; ``prune`` then deletes those it
superseded. Opening the store with a checkpoint's index deletes every state file the index
does not name: states of a round after the checkpoint (which the resumed run redoes), older
files a crash before ``prune`` left behind, and the temporary files of a write a crash
cut short (``outputs.files.remove_orphans``).

Every state file's content digest (``outputs.files.content_digest``) is kept with the index
and saved in the checkpoint (``Checkpoint.client_digests``), so a resume finds a state file
that changed after it was written (``outputs.run_folder.check_resumable``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from reefl.federation.checkpoint import Checkpoint, CheckpointError
from reefl.outputs.files import DamagedFile, remove_orphans, verify_safetensors, write_atomically
from reefl.outputs.run_folder import CLIENT_STATES_DIR as STORE_DIR
from reefl.outputs.run_folder import client_state_name as state_file_name

_STATE_FILE = re.compile(r"(\d+)\.r(\d+)\.safetensors")

Tensors = dict[str, torch.Tensor]


def _parse(name: str) -> tuple[int, int] | None:
    """(partition id, round) of a state file's name; None for any other name."""
    match = _STATE_FILE.fullmatch(name)
    return None if match is None else (int(match[1]), int(match[2]))


class ClientStateStore:
    """Partition id -> the method's state of that client, in files under ``folder`` (created
    on the first ``put``), or in memory when ``folder`` is None (a strategy built without a
    run folder, as in unit tests)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._rounds: dict[int, int] = {}  # partition id -> round of its latest state
        self._digests: dict[int, str] = {}  # partition id -> content digest of that file
        self._in_memory: dict[int, Tensors] = {}  # only when folder is None
        self._superseded: list[Path] = []  # files to delete once a checkpoint no longer needs

    @classmethod
    def open(cls, folder: Path, index: Mapping[int, int],
             digests: Mapping[int, str] | None = None) -> ClientStateStore:
        """The store in ``folder`` as a checkpoint with ``index`` (partition id -> round)
        and ``digests`` (partition id -> content digest; None: a checkpoint that recorded
        none) left it: files the index does not name, and temporary files, are deleted.
        CheckpointError if a file the index names is missing, damaged, or (with
        ``digests``) not the one recorded."""
        store = cls(folder)
        store._rounds = dict(index)
        remove_orphans(folder)
        found: set[int] = set()
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            key = _parse(path.name)
            if key is not None and index.get(key[0]) == key[1]:
                found.add(key[0])
            elif key is not None:
                path.unlink()
        missing = sorted(set(index) - found)
        if missing:
            raise CheckpointError(f"{folder} lacks the client states the checkpoint names "
                                  f"(partition ids {missing[:12]}, {len(missing)} in all)")
        for pid in sorted(index):
            path = store._path(pid, index[pid])
            try:
                _, digest = verify_safetensors(path)
            except DamagedFile as err:
                raise CheckpointError(f"{path} is damaged: {err}") from None
            if digests is not None and digests.get(pid) != digest:
                raise CheckpointError(f"{path} is not the client state the checkpoint "
                                      "recorded (it changed since)")
            store._digests[pid] = digest
        return store

    def index(self) -> dict[int, int]:
        """Partition id -> round of its latest state (a copy: what a checkpoint saves)."""
        return dict(self._rounds)

    def digests(self) -> dict[int, str]:
        """Partition id -> content digest of its latest state file (what a checkpoint saves
        beside ``index``; {} in memory)."""
        return dict(self._digests)

    def get(self, partition_id: int) -> Tensors:
        """The latest state of ``partition_id`` ({} if it has none)."""
        if self.folder is None:
            return dict(self._in_memory.get(partition_id, {}))
        if partition_id not in self._rounds:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self._path(partition_id, self._rounds[partition_id])))

    def put(self, partition_id: int, server_round: int, state: Tensors) -> None:
        """Keep ``state`` as ``partition_id``'s state returned in ``server_round``. Its file
        is written at once; the one it replaces is deleted by the next ``prune``."""
        if self.folder is None:
            self._in_memory[partition_id] = state
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._digests[partition_id] = write_atomically(
                self._path(partition_id, server_round), state)
            old = self._rounds.get(partition_id)
            if old is not None and old != server_round:
                self._superseded.append(self._path(partition_id, old))
        self._rounds[partition_id] = server_round

    def prune(self) -> None:
        """Delete the files replaced since the last prune. Call it only after a checkpoint
        of the current ``index`` is saved: until then the previous checkpoint names them."""
        for path in self._superseded:
            path.unlink(missing_ok=True)
        self._superseded.clear()

    def _path(self, partition_id: int, server_round: int) -> Path:
        assert self.folder is not None
        return self.folder / state_file_name(partition_id, server_round)


def open_run_store(run_dir: Path, checkpoint: Checkpoint | None) -> ClientStateStore:
    """The client-state store of the run in ``run_dir`` as ``checkpoint`` left it (empty
    for a new run, ``checkpoint`` None). The states a ``reefl-checkpoint-1`` file held itself
    move into the store as states of its round; that checkpoint keeps them until the next
    one replaces it, so a crash before then loses nothing."""
    if checkpoint is None:
        return ClientStateStore.open(run_dir / STORE_DIR, {})
    sealed = bool(checkpoint.config_sha256)  # a checkpoint that recorded digests
    store = ClientStateStore.open(run_dir / STORE_DIR, checkpoint.client_rounds,
                                  checkpoint.client_digests if sealed else None)
    for pid, state in checkpoint.legacy_client_states.items():
        store.put(pid, checkpoint.round, state)
    return store
