"""The server's checkpoint: everything a run needs to continue after its last finished round
exactly as if it had not stopped.

One safetensors file, ``<run_dir>/checkpoint.safetensors``, rewritten after every round:
write a temporary file in the same folder, flush it to disk, then rename it over the old one,
so a run killed at any moment leaves either the previous round's checkpoint or the new one,
never half of one. It holds

* ``global/<name>``: the global model;
* ``server/<name>``: the method's server state (``Method.server_state``: FedAdam's moments,
  FedDyn's h, InclusiveFL's momentum);
* ``client/<partition id>/<name>``: the per-client states that live on the server (FedDyn's
  g_i), which the server sends with each training message;
* metadata (strings): the format, the round, the config's digest, and JSON for the partition
  ids seen so far (with tier and size), the last evaluation and the participation totals.

Client sampling and local training are seeded by (seed, round[, partition id]) and keep no
random state across rounds, so the round number is all the randomness a resume needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "reefl-checkpoint-1"

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
    client_states: dict[int, Tensors] = field(default_factory=dict)
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)
    """Partition id -> {"tier", "num-examples"} of every partition seen so far."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically (temporary file, fsync, rename); returns its path."""
    from safetensors.torch import save_file

    tensors = {f"global/{k}": v for k, v in checkpoint.global_state.items()}
    tensors.update({f"server/{k}": v for k, v in checkpoint.server_state.items()})
    for pid, state in checkpoint.client_states.items():
        tensors.update({f"client/{pid}/{k}": v for k, v in state.items()})
    metadata = {
        "format": FORMAT,
        "round": str(checkpoint.round),
        "config_digest": checkpoint.config_digest,
        "partitions": json.dumps({str(k): v for k, v in checkpoint.partitions.items()}),
        "last_eval": json.dumps(checkpoint.last_eval),
        "totals": json.dumps(checkpoint.totals),
        "elapsed_seconds": repr(checkpoint.elapsed_seconds),
    }
    path = run_dir / CHECKPOINT_NAME
    partial = path.with_name(path.name + ".partial")
    # clone: states may hold views of one storage (LoRA's merged weights), which safetensors
    # refuses to save as separate names
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(partial),
              metadata=metadata)
    with partial.open("rb") as stream:
        os.fsync(stream.fileno())
    os.replace(partial, path)
    return path


def load_checkpoint(run_dir: Path, config_digest: str) -> Checkpoint:
    """The checkpoint in ``run_dir``; CheckpointError (one line) if there is none, it cannot
    be read, or it was saved by a run of another config."""
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
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a reefl checkpoint ({FORMAT})")
    if metadata["config_digest"] != config_digest:
        raise CheckpointError(f"{path} was saved by a run of another config; resume with the "
                              "run folder's own config.json")
    clients: dict[int, Tensors] = {}
    for key, value in tensors.items():
        if key.startswith("client/"):
            _, pid, name = key.split("/", 2)
            clients.setdefault(int(pid), {})[name] = value
    return Checkpoint(
        round=int(metadata["round"]),
        config_digest=metadata["config_digest"],
        global_state=_strip(tensors, "global/"),
        server_state=_strip(tensors, "server/"),
        client_states=clients,
        partitions={int(k): v for k, v in json.loads(metadata["partitions"]).items()},
        last_eval=json.loads(metadata["last_eval"]),
        totals=json.loads(metadata["totals"]),
        elapsed_seconds=float(metadata["elapsed_seconds"]),
    )


def _strip(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
