"""The simulation's share of this machine: one simulated SuperNode per client, the CPUs
(and GPUs) split among the ClientApps of a round, and the user's ``--federation-config`` on
top, checked as ``flwr run`` checks it but before anything starts."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from reefl.launch.errors import RunConfigError, one_line
from reefl.launch.run_config import parse_pairs, toml_value


def available_cpus() -> int:
    """CPUs this process may use (affinity-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


MAX_CLIENTS_PER_GPU = 4  # ClientApps sharing one GPU at most (DeiT-S at batch 32: ~3 GB each)


def cuda_devices() -> int:
    """CUDA devices torch sees here (0 without a GPU or a CUDA build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_federation(config: dict[str, Any], cpus: int | None = None,
                       gpus: int | None = None) -> dict[str, Any]:
    """Simulation settings that match the run config.

    * ``num-supernodes = num-clients``: one simulated SuperNode per client.
    * ``client-resources-num-cpus``: CPUs per ClientApp (Flower's default is 2, i.e. one
      ClientApp at a time on a 2-core machine). Ray runs ``cpus // n`` ClientApps in
      parallel and sets ``OMP_NUM_THREADS=n`` in each, which is torch's thread count. We
      give each of the clients of one round an equal share, at least 1 CPU: on 2 cores that
      is 2 ClientApps with 1 thread each, measured ~2x the throughput of 1 x 2 threads for
      the small ViT (Flower only accepts whole CPUs here).
    * ``client-resources-num-gpus`` (only with CUDA devices): the GPUs shared by the
      ClientApps that run at once, at most ``MAX_CLIENTS_PER_GPU`` per GPU (a share of 1/4
      lets Ray place 4 on one GPU) and at most one GPU each.
    """
    cpus = cpus or available_cpus()
    gpus = cuda_devices() if gpus is None else gpus
    federation: dict[str, Any] = {}
    clients = config.get("num-clients")
    per_round = 1
    if isinstance(clients, int) and not isinstance(clients, bool) and clients > 0:
        federation["num-supernodes"] = clients
        fraction = config.get("fraction-train", 1.0)
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            fraction = 1.0
        per_round = max(1, math.ceil(fraction * clients))
        federation["client-resources-num-cpus"] = max(1, cpus // per_round)
    else:
        federation["client-resources-num-cpus"] = 1
    if gpus > 0:
        parallel = max(1, min(per_round, cpus // federation["client-resources-num-cpus"]))
        federation["client-resources-num-gpus"] = min(1.0, max(gpus / parallel,
                                                              1 / MAX_CLIENTS_PER_GPU))
    return federation


def federation_config(config: dict[str, Any], user: Sequence[str] = ()) -> dict[str, Any]:
    """Default simulation settings, then the user's ``--federation-config`` on top, checked
    (``check_federation``) before anything starts."""
    from flwr.supercore.utils import simulation_config_from_json

    parsed: dict[str, Any] = {}
    for item in (item for item in user if item):
        if "=" not in item:
            raise RunConfigError(f"--federation-config '{item}' is not key=value")
        parsed.update(parse_pairs(item, "--federation-config"))
    merged = {**default_federation(config), **parsed}
    try:  # the same check `flwr run` makes, but before anything starts
        simulation_config_from_json({k.replace("-", "_"): v for k, v in merged.items()})
    except (ValueError, TypeError) as err:
        raise RunConfigError(f"--federation-config: {one_line(str(err))}") from None
    check_federation(config, merged)
    return merged


def check_federation(config: dict[str, Any], federation: dict[str, Any]) -> None:
    """Simulation settings Flower accepts but this run cannot use: a SuperNode count other
    than ``num-clients`` (the ServerApp waits for one SuperNode per client), fewer than one
    CPU per ClientApp (Ray divides by it) or a negative GPU share."""
    clients, nodes = config.get("num-clients"), federation.get("num-supernodes")
    if isinstance(clients, int) and nodes is not None and nodes != clients:
        raise RunConfigError(f"--federation-config: num-supernodes={nodes} differs from the run "
                             f"config's num-clients={clients}; they must be equal (leave "
                             "num-supernodes out to get that)")
    cpus = federation.get("client-resources-num-cpus", 1)
    if cpus < 1:
        raise RunConfigError("--federation-config: client-resources-num-cpus must be at "
                             f"least 1; got '{cpus}'")
    gpus = federation.get("client-resources-num-gpus", 0)
    if gpus < 0:
        raise RunConfigError("--federation-config: client-resources-num-gpus must be 0 or "
                             f"more; got '{gpus}'")



def federation_arg(federation: dict[str, Any]) -> str:
    """The ``--federation-config`` value e.g. ``num-supernodes=20 client-resources-num-cpus=1``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())

