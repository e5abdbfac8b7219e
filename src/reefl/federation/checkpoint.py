"""The server's checkpoint: everything a run needs to continue after its last finished round
exactly as if it had not stopped.

One safetensors file, ``<run_dir>/checkpoint.safetensors``, rewritten after every round:
write a temporary file in the same folder, flush it to disk, then rename it over the old one,
so a run killed at any moment leaves either the previous round's checkpoint or the new one,
never half of one. It holds

* ``global/<name>``: the global model;
* ``server/<name>``: the method's server state (``Method.server_state``: FedAdam's moments,
  FedDyn's h, InclusiveFL's momentum);
* metadata (strings): the format, the round, the config's digest, and JSON for the partition
  ids seen so far (with tier and size), the last evaluation, the participation totals and
  ``client_rounds``, the index of the per-client states that live on the server (FedDyn's
  g_i): partition id -> the round whose file in ``<run_dir>/client-states/`` holds its state
  (``client_store``). The states themselves are files of their own, written when a client
  returns one, so the checkpoint does not grow with (or rewrite) the states of idle clients.

Digests (``reefl-checkpoint-3``): the file carries its own (``outputs.files.DIGEST_KEY``,
over its header and tensor data, sealed into it before the rename, so it is atomic with the
checkpoint), and records the SHA-256 of the run's config.json (``config_sha256``) and the
content digest of every client state its index names (``client_digests``). A resume checks
them all before anything starts (``outputs.run_folder.check_resumable``: the launcher, and
the ServerApp again), so a changed bit, a truncation, a missing state or another config is
one line naming the file.

A checkpoint of the first format (``reefl-checkpoint-1``) held those states itself, as
``client/<partition id>/<name>`` tensors; it still loads, with them in
``Checkpoint.legacy_client_states`` (moved into the store on resume). Formats 1 and 2
recorded no digests: they resume after the checks their content allows (structure, config
digest, the client states' presence), with a warning; the next checkpoint records them.

Client sampling and local training are seeded by (seed, round[, partition id]) and keep no
random state across rounds, so the round number is all the randomness a resume needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reefl.outputs.files import write_atomically
from reefl.outputs.run_folder import CHECKPOINT_FILE as CHECKPOINT_NAME
from reefl.outputs.run_folder import CHECKPOINT_FORMATS, SEALED_FORMAT

FORMAT = SEALED_FORMAT
LEGACY_FORMAT = "reefl-checkpoint-1"
"""Client states as ``client/<pid>/<name>`` tensors in the checkpoint, no ``client_rounds``."""

Tensors = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint that cannot be read, or that belongs to another run config."""


@dataclass
class Checkpoint:
    """The state after round ``round`` (0: before the first round)."""

    round: int
    config_digest: str
    global_state: Tensors
    server_state: Tensors = field(default_factory=dict)
    client_rounds: dict[int, int] = field(default_factory=dict)
    """Partition id -> round of its state file in ``client-states/`` (``client_store``)."""
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)
    """Partition id -> {"tier", "num-examples"} of every partition seen so far."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    legacy_client_states: dict[int, Tensors] = field(default_factory=dict)
    """The client states a ``reefl-checkpoint-1`` file held itself (never written)."""
    config_sha256: str = ""
    """The SHA-256 of the run's config.json ("" in formats 1 and 2)."""
    client_digests: dict[int, str] = field(default_factory=dict)
    """Partition id -> content digest of its state file (``client_rounds``'); {} in 1, 2."""


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically (``outputs.files.write_atomically``); returns its path."""
    tensors = {f"global/{k}": v for k, v in checkpoint.global_state.items()}
    tensors.update({f"server/{k}": v for k, v in checkpoint.server_state.items()})
    metadata = {
        "format": FORMAT,
        "round": str(checkpoint.round),
        "config_digest": checkpoint.config_digest,
        "client_rounds": json.dumps({str(k): v for k, v in checkpoint.client_rounds.items()}),
        "partitions": json.dumps({str(k): v for k, v in checkpoint.partitions.items()}),
        "last_eval": json.dumps(checkpoint.last_eval),
        "totals": json.dumps(checkpoint.totals),
        "elapsed_seconds": repr(checkpoint.elapsed_seconds),
        "config_sha256": checkpoint.config_sha256,
        "client_digests": json.dumps({str(k): v for k, v in
                                      checkpoint.client_digests.items()}),
    }
    path = run_dir / CHECKPOINT_NAME
    write_atomically(path, tensors, metadata)
    return path


def load_checkpoint(run_dir: Path, config_digest: str | tuple[str, ...]) -> Checkpoint:
    """The checkpoint in ``run_dir``; CheckpointError (one line) if there is none, it cannot
    be read, or it was saved by a run of another config (``config_digest``: the digest of
    the run's config, or those it may have, ``run_folder.config_digests``). The files it
    relies on are checked by ``run_folder.check_resumable``, not here."""
    from safetensors import safe_open

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
            tensors = {k: stream.get_tensor(k) for k in stream.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if metadata.get("format") not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{path} is not a reefl checkpoint ({FORMAT})")
    accepted = (config_digest,) if isinstance(config_digest, str) else config_digest
    if metadata["config_digest"] not in accepted:
        raise CheckpointError(f"{path} was saved by a run of another config; resume with the "
                              "run folder's own config.json")
    return Checkpoint(
        round=int(metadata["round"]),
        config_digest=metadata["config_digest"],
        global_state=_strip(tensors, "global/"),
        server_state=_strip(tensors, "server/"),
        client_rounds={int(k): int(v)
                       for k, v in json.loads(metadata.get("client_rounds", "{}")).items()},
        partitions={int(k): v for k, v in json.loads(metadata["partitions"]).items()},
        last_eval=json.loads(metadata["last_eval"]),
        totals=json.loads(metadata["totals"]),
        elapsed_seconds=float(metadata["elapsed_seconds"]),
        legacy_client_states=_legacy_client_states(tensors),
        config_sha256=metadata.get("config_sha256", ""),
        client_digests={int(k): str(v)
                        for k, v in json.loads(metadata.get("client_digests", "{}")).items()},
    )


def _strip(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _legacy_client_states(tensors: Tensors) -> dict[int, Tensors]:
    """The ``client/<pid>/<name>`` tensors of a ``reefl-checkpoint-1`` file, by partition id
    (none in the current format)."""
    clients: dict[int, Tensors] = {}
    for key, value in _strip(tensors, "client/").items():
        pid, name = key.split("/", 1)
        clients.setdefault(int(pid), {})[name] = value
    return clients
