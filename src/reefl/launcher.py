"""``reefl run``: a thin launcher over Flower's ``flwr run <app-dir>``.

What it adds on top of ``flwr run``:

* the run config is merged and checked *before* any Flower process starts (Flower's own
  parser for ``--run-config``, unknown keys rejected like Flower does, then
  ``reefl.config.validate``);
* the local simulation matches the run config: one simulated SuperNode per client, and
  the CPUs shared among the ClientApps of a round, at least one each
  (``--federation-config``; the user's own settings win);
* ``output-dir`` is made absolute and an empty ``run-name`` is filled in, so the run folder
  ``<output-dir>/<run-name>/`` is known in advance;
* every run gets its own short-lived SuperLink: a private ``FLWR_HOME`` (temporary
  directory) whose ``config.toml`` points at a ``flower-superlink`` started here on a free
  port, with runtime dependency installation disabled, and stopped again — together with
  everything it spawned (SuperExec, flwr-simulation, Ray) — when the run ends, fails or is
  interrupted; Ray's session folder is made inside that FLWR_HOME and removed with it;
* Flower's whole log goes to ``flower.log`` in the run folder; the terminal shows one
  progress line instead, or the log itself with ``--verbose`` (``reefl.progress``).

``run_app`` is the function behind ``reefl run``; tests and ``reefl compare`` call it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from reefl.app_files import stage_app
from reefl.progress import FlowerLog, LogView, ProgressView
from reefl.report import FLOWER_LOG, holds_run_files

if TYPE_CHECKING:
    from reefl.config import RunConfig

# Environment every Flower process of a run gets.
ENV_FORCED = {
    # Run the apps in the user's environment: without this the SuperLink/SuperExec
    # `uv`-installs the app's dependencies (CUDA torch, ...) into a fresh env per run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # `flwr run --stream` prints log chunks without flushing; unbuffered so lines are live.
    "PYTHONUNBUFFERED": "1",
}
ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    # Each flwr/flower-* process would otherwise POST an update check (cached in FLWR_HOME,
    # which is fresh for every run here), in a non-daemon thread with a 3 s timeout.
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
CONNECTION = "reefl-local"
SUPERLINK_START_TIMEOUT = 30.0
STOP_GRACE = 5.0  # seconds a process gets between SIGTERM and SIGKILL
CASCADE_GRACE = 2.0  # seconds SuperExec's children get to follow the SuperLink out
CHECKPOINT_FILE = "checkpoint.safetensors"  # what the ServerApp saves after every round


class LaunchError(Exception):
    """A one-line problem that ends ``reefl run``; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class RunConfigError(LaunchError):
    """The run config (or federation config) is not acceptable; nothing was started."""

    exit_code = 2


class RunFailed(LaunchError):
    """Flower ran but the run did not produce ``final.json`` (or ``flwr run`` failed)."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


# -- app discovery and config --------------------------------------------------------------


def _read_pyproject(app_dir: Path) -> dict[str, Any] | None:
    """The parsed pyproject.toml of ``app_dir`` if it declares a Flower app, else None."""
    path = app_dir / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    app = data.get("tool", {}).get("flwr", {}).get("app")
    return data if isinstance(app, dict) else None


def _installed_repo_root() -> Path | None:
    """The checkout this module comes from (``<repo>/src/reefl/launcher.py``), if any."""
    here = Path(__file__).resolve()
    return here.parents[2] if here.parent.parent.name == "src" else None


def find_app_dir(start: Path | None = None) -> Path:
    """The Flower app to run when ``--app`` is not given.

    The nearest directory from ``start`` (default: cwd) upwards whose pyproject.toml has
    ``[tool.flwr.app]``; else the repository this module was installed from
    (``src/reefl/launcher.py`` -> two levels above ``src/reefl``); else a LaunchError.
    """
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if _read_pyproject(directory) is not None:
            return directory
    repo = _installed_repo_root()
    if repo is not None and _read_pyproject(repo) is not None:
        return repo
    raise RunConfigError(
        f"no Flower app found: no pyproject.toml with [tool.flwr.app] in {start} or its "
        "parents; pass --app DIR"
    )


def resolve_app_dir(app_dir: Path | str | None, cwd: Path | None = None) -> Path:
    """``app_dir`` made absolute and checked, or the discovered default."""
    cwd = cwd or Path.cwd()
    if app_dir is None:
        return find_app_dir(cwd)
    path = (cwd / Path(app_dir).expanduser()).resolve()
    if _read_pyproject(path) is None:
        raise RunConfigError(f"{path} is not a Flower app (no pyproject.toml with [tool.flwr.app])")
    return path


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's flat ``[tool.flwr.app.config]``, as Flower flattens it."""
    from flwr.common.config import flatten_dict

    data = _read_pyproject(app_dir) or {}
    return flatten_dict(data["tool"]["flwr"]["app"].get("config", {}))


# Flower's pattern for one key=value pair (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_pairs(text: str, where: str) -> dict[str, Any]:
    """One ``k=v k2=v2`` string parsed exactly like ``flwr run --run-config`` parses it.

    Flower silently drops what its pattern does not match (``key=`` with no value, a stray
    word); here that is a RunConfigError naming the token, prefixed by ``where``. Where
    Flower rejects the whole string ("invalid format"), the error names the first pair it
    cannot read: "<key> must be <its type>; got '<value>'" (prefixed by ``where`` unless
    that is ``--run-config``: run-config keys are named as validation names them).
    """
    from flwr.common.config import parse_config_args

    leftover = _PAIR.sub(" ", text).split()
    if leftover:
        token = leftover[0]
        problem = "has no value" if token.endswith("=") else "is not key=value"
        raise RunConfigError(f"{where}: '{token}' {problem} (in '{text}')")
    try:
        return parse_config_args([text])
    except Exception as err:  # ValueError, click.ClickException: Flower's messages
        message = _unreadable_pair(text) or _one_line(getattr(err, "message", None) or str(err))
        prefix = "" if where == "--run-config" else f"{where}: "
        raise RunConfigError(prefix + message) from None


def _unreadable_pair(text: str) -> str | None:
    """Why Flower cannot read ``text`` (its pairs, one TOML line each), pair by pair: a key
    that is no TOML key, a value that is no TOML value (in the key's own words), a key given
    twice; None when no single pair explains it."""
    from reefl.config import unparsed_value_problem

    seen: set[str] = set()
    for key, value in _PAIR.findall(text):
        try:
            tomllib.loads(f"{key} = 0")
        except tomllib.TOMLDecodeError:
            return f"'{key}' is not a run-config key (in '{key}={value}')"
        try:
            tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError:
            return unparsed_value_problem(key, value)
        if key in seen:
            return f"{key} is given twice in '{text}'"
        seen.add(key)
    return None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` values, in order (later wins): key=value strings (``parse_pairs``)
    and TOML files (presets: their ``base`` resolved).

    Unlike Flower, files and key=value strings may be mixed, and anything in a string that
    is not a ``key=value`` pair is an error, not ignored.
    """
    from reefl.presets import PresetError, PresetValueError, read_config_file

    values: dict[str, Any] = {}
    for item in (item for item in overrides if item):
        if item.endswith(".toml"):
            try:
                values.update(read_config_file(Path(item)))
            except PresetValueError as err:  # names its key, as validation does
                raise RunConfigError(str(err)) from None
            except PresetError as err:
                raise RunConfigError(f"--run-config: {err}") from None
        elif "=" not in item:
            raise RunConfigError(f"--run-config '{item}' is neither key=value nor a .toml file")
        else:
            values.update(parse_pairs(item, "--run-config"))
    return values


def with_preset(preset: str | None, overrides: Sequence[str]) -> list[str]:
    """``overrides`` with the file of preset ``preset`` first (so the command line wins)."""
    if not preset:
        return list(overrides)
    from reefl.presets import PresetError, preset_path

    try:
        return [str(preset_path(preset)), *overrides]
    except PresetError as err:
        raise RunConfigError(str(err)) from None


def merge_config(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated with overrides; a key the app does not declare is an error."""
    for key in overrides:
        if key not in defaults:
            raise RunConfigError(
                f"unknown run-config key '{key}' (not in the app's [tool.flwr.app.config])"
            )
    return {**defaults, **overrides}


def pack_method_options(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``user`` with every key that a method declares but the app's pyproject does not list
    moved into ``method-options`` (Flower accepts only the keys an app declares; a method
    outside the package, or a new one, need not be listed there)."""
    from reefl.config import format_method_options, method_setting_keys, parse_method_options

    if "method-options" not in defaults:
        return user
    declared = method_setting_keys()
    moved = {k: v for k, v in user.items() if k not in defaults and k in declared}
    if not moved:
        return user
    options = {**parse_method_options(str(user.get("method-options", ""))), **moved}
    kept = {k: v for k, v in user.items() if k not in moved}
    return {**kept, "method-options": format_method_options(options)}


def make_run_name(config: dict[str, Any], now: float | None = None) -> str:
    """``<method>-s<seed>-<YYYYmmdd-HHMMSS>``, e.g. ``reefl-s0-20250101-120000``."""
    from reefl.report import default_run_name

    return default_run_name(config.get("method", "run"), config.get("seed", 0), now)


def _unique_run_name(output_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if that folder already exists."""
    candidate, k = name, 1
    while (output_dir / candidate).exists():
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def _is_reefl_app(app_dir: Path) -> bool:
    """Whether the app's components are reefl's (so reefl's validator/report apply)."""
    data = _read_pyproject(app_dir) or {}
    components = data["tool"]["flwr"]["app"].get("components", {})
    return str(components.get("serverapp", "")).startswith("reefl.")


def _validate(merged: dict[str, Any]) -> str:
    """``reefl.config``'s checks of a merged flat config (``RunConfig.from_flat``), turned
    into the launcher's one-line error; returns the config's ``config_digest``, computed as
    the ServerApp computes it (over ``RunConfig.from_flat(merged).to_flat()``)."""
    from reefl.config import ConfigError, RunConfig
    from reefl.report import config_digest

    try:
        return config_digest(RunConfig.from_flat(merged))
    except ConfigError as err:
        raise RunConfigError(_one_line(str(err))) from None


def resolved_config(overrides: Sequence[str], app_dir: Path | str | None = None
                    ) -> RunConfig:
    """The run config ``reefl run`` would use (``prepare_run``'s, so validated the same way;
    RunConfigError otherwise), as a typed object. Starts nothing."""
    from reefl.config import RunConfig  # deferred, as in _validate

    return RunConfig.from_flat(prepare_run(overrides, app_dir).config)


@dataclass
class PreparedRun:
    """Everything decided before Flower starts."""

    app_dir: Path
    config: dict[str, Any]  # merged run config, as the ServerApp will see it
    overrides: dict[str, Any]  # what is sent with `flwr run --run-config`
    federation: dict[str, Any]  # what is sent with `flwr run --federation-config`
    run_dir: Path
    digest: str | None = None  # config_digest of a reefl run config, as the ServerApp has it


def prepare_run(
    overrides: Sequence[str],
    app_dir: Path | str | None = None,
    federation_overrides: Sequence[str] = (),
    cwd: Path | None = None,
    now: float | None = None,
    existing_ok: bool = False,
) -> PreparedRun:
    """Merge, complete and validate the config; raises RunConfigError. Starts nothing.

    An explicit ``run-name`` whose folder already holds something is an error unless
    ``existing_ok`` (``reefl compare`` decides itself what to do with such a folder).
    """
    cwd = (cwd or Path.cwd()).resolve()
    app = resolve_app_dir(app_dir, cwd)
    return _prepare(app, parse_overrides(overrides), federation_overrides, cwd, now,
                    existing_ok)


def prepare_resume(
    run_dir: Path | str,
    app_dir: Path | str | None = None,
    federation_overrides: Sequence[str] = (),
    cwd: Path | None = None,
) -> PreparedRun:
    """The run that continues ``run_dir``: exactly its config.json (the resolved flat config
    the ServerApp wrote) plus ``resume = true``, so the same output-dir and run-name.
    RunConfigError if there is no readable config.json, or it names another folder."""
    cwd = (cwd or Path.cwd()).resolve()
    folder = (cwd / Path(run_dir).expanduser()).resolve()
    try:
        stored = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RunConfigError(f"--resume: {folder} has no readable config.json, so it is no run "
                             f"folder ({_one_line(str(err))})") from None
    app = resolve_app_dir(app_dir, cwd)
    prepared = _prepare(app, {**stored, "resume": True}, federation_overrides, cwd, None, True)
    if prepared.run_dir != folder:
        raise RunConfigError(f"--resume: {folder}/config.json is of run folder "
                             f"{prepared.run_dir} (was the folder moved?)")
    return prepared


def _prepare(app: Path, user: dict[str, Any], federation_overrides: Sequence[str], cwd: Path,
             now: float | None, existing_ok: bool) -> PreparedRun:
    """``prepare_run`` once the user's overrides are parsed."""
    defaults = app_defaults(app)
    if _is_reefl_app(app):
        user = pack_method_options(defaults, user)
    merged = merge_config(defaults, user)
    sent = dict(user)
    for key in ("output-dir", "run-name"):
        if key not in merged:
            raise RunConfigError(f"the app's [tool.flwr.app.config] has no '{key}' key")
    output_dir = (cwd / Path(str(merged["output-dir"])).expanduser()).resolve()
    explicit = str(merged["run-name"]).strip()
    run_name = explicit or _unique_run_name(output_dir, make_run_name(merged, now))
    if "/" in run_name or run_name in (".", ".."):
        raise RunConfigError(f"run-name must be a plain folder name (no '/'); got '{run_name}'")
    if explicit:
        _check_run_folder(output_dir, run_name, existing_ok)
    sent["output-dir"] = merged["output-dir"] = str(output_dir)
    sent["run-name"] = merged["run-name"] = run_name
    digest = _validate(merged) if _is_reefl_app(app) else None
    federation = federation_config(merged, federation_overrides)
    return PreparedRun(app, merged, sent, federation, output_dir / run_name, digest)


def holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and is anything but an empty folder (or one holding only
    the FLOWER_LOG of a run that failed before it started: ``holds_run_files``)."""
    return holds_run_files(folder)


def _check_run_folder(output_dir: Path, run_name: str, existing_ok: bool) -> None:
    """An explicit run-name must not name a folder that already holds something (a run's
    files would be mixed, and the ServerApp refuses it), unless ``existing_ok``."""
    folder = output_dir / run_name
    if existing_ok or not holds_files(folder):
        return
    raise RunConfigError(f"run-name '{run_name}': {folder} already exists and is not empty; "
                         f"continue that run with `reefl run --resume {folder}` or choose "
                         "another run-name")


def finished_final(run_dir: Path, digest: str | None) -> dict[str, Any] | None:
    """``run_dir``'s final.json if it is there and says it is of the config with ``digest``
    (its ``config_digest``), else None."""
    try:
        final = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(final, dict) and digest is not None and final.get("config_digest") == digest
    return final if ok else None


def can_resume(run_dir: Path, digest: str | None) -> bool:
    """Whether ``run_dir`` holds a checkpoint of a run whose config.json has ``digest``."""
    from reefl.config import ConfigError, RunConfig
    from reefl.report import config_digest

    if digest is None or not (run_dir / CHECKPOINT_FILE).is_file():
        return False
    try:
        stored = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, ConfigError):
        return False
    return config_digest(stored) == digest


# -- federation (simulation) settings -------------------------------------------------------


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
        raise RunConfigError(f"--federation-config: {_one_line(str(err))}") from None
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


def toml_value(value: Any) -> str:
    """A value as Flower's ``k=v`` parser reads it back (it knows no escapes, so a string
    takes whichever quote kind it does not contain)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"  # TOML literal string
    raise RunConfigError(f"--run-config: a value with both quote kinds is not supported: {text}")


def federation_arg(federation: dict[str, Any]) -> str:
    """The ``--federation-config`` value e.g. ``num-supernodes=20 client-resources-num-cpus=1``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())


# -- processes ------------------------------------------------------------------------------


def flower_env(flwr_home: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process of a run."""
    env = os.environ.copy()
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(ENV_FORCED)
    env["FLWR_HOME"] = str(flwr_home)
    if bin_dir is not None:  # SuperLink/SuperExec find their children on PATH
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def _flower_bin_dir() -> Path | None:
    """The scripts folder of the Python running this (where flwr, flower-superlink live)."""
    bin_dir = Path(sys.executable).parent
    exe = "flower-superlink.exe" if os.name == "nt" else "flower-superlink"
    return bin_dir if (bin_dir / exe).exists() else None


# The longest path Ray makes below its temp root: <root>/ray/<session>/sockets/plasma_store,
# its session named session_<date>_<microseconds>_<pid> (ray/_private/node.py), and the
# longest Unix socket path it accepts (ray/_private/utils.py, validate_socket_filepath).
RAY_SOCKET_TAIL = "/ray/session_2000-01-01_00-00-00_000000_4194304/sockets/plasma_store"
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def ray_temp_root() -> Path:
    """The folder that Ray puts its temp dir ``ray/`` into, decided as Ray decides it
    (ray._common.utils.get_default_system_temp_dir): RAY_TMPDIR; on Linux TMPDIR; /tmp on
    Linux and macOS; the system's temp dir elsewhere."""
    env = os.environ
    if env.get("RAY_TMPDIR"):
        return Path(env["RAY_TMPDIR"])
    if sys.platform.startswith("linux") and env.get("TMPDIR"):
        return Path(env["TMPDIR"])
    if sys.platform.startswith(("linux", "darwin")):
        return Path("/tmp")  # noqa: S108 - where Ray itself goes
    return Path(tempfile.gettempdir())


def private_home_parent() -> Path | None:
    """Where a run's private FLWR_HOME is made: in ``ray_temp_root`` (so that Ray's paths
    inside it are barely longer than Ray's own), or the system's temp dir (None) if that
    cannot be written."""
    root = ray_temp_root()
    return root if os.access(root, os.W_OK | os.X_OK) else None


def ray_env(flwr_home: Path) -> dict[str, str]:
    """``RAY_TMPDIR`` = ``flwr_home`` for the Flower processes of a run: the Ray session that
    the simulation starts (its ``ray/session_*`` folder, ~0.7 MB, which Ray leaves behind)
    is then made in the run's private FLWR_HOME and removed with it, and no other session
    (another user's, another run's) is touched. Nothing (Ray's default place) where Ray's
    socket paths would get too long there."""
    if len(str(flwr_home)) + len(RAY_SOCKET_TAIL) > MAX_SOCKET_PATH:
        return {}
    return {"RAY_TMPDIR": str(flwr_home)}


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_flower_config(flwr_home: Path, address: str, connection_name: str = CONNECTION,
                        root_certificates: Path | None = None) -> Path:
    """A private ``$FLWR_HOME/config.toml`` whose default connection is our SuperLink at
    ``address``: TLS trusting ``root_certificates`` if given, else insecure. Serialized with
    Flower's own helpers, so ``flwr`` reads it back as it wrote it."""
    import tomli_w
    from flwr.cli.flower_config import (
        FLOWER_CONFIG_FILE,
        SuperLinkConnection,
        SuperLinkConnectionTomlKey,
        serialize_superlink_connection,
    )

    if root_certificates is None:
        connection = SuperLinkConnection(connection_name, address=address, insecure=True)
    else:
        connection = SuperLinkConnection(connection_name, address=address,
                                         root_certificates=str(root_certificates))
    config = {SuperLinkConnectionTomlKey.SUPERLINK: {
        SuperLinkConnectionTomlKey.DEFAULT: connection_name,
        connection_name: serialize_superlink_connection(connection),
    }}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / FLOWER_CONFIG_FILE
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def still_running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs: same pid *and* start time (psutil compares both, so a
    reused pid is not ours), and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(processes: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``timeout`` seconds. A zombie counts
    as gone: psutil.wait_procs waits until another process's zombie is reaped, which for
    Ray's processes took the whole timeout (measured)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in processes if still_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def stop_processes(processes: Sequence[psutil.Process], grace: float = STOP_GRACE,
                   kill_first: bool = False) -> None:
    """SIGTERM ``processes``, then SIGKILL those still running after ``grace`` seconds (Ray's
    agents ignore SIGTERM); SIGKILL alone with ``kill_first`` (as a crash would end them).
    psutil refuses to signal a pid that now belongs to another process, so only these very
    processes are hit."""
    sends = (psutil.Process.kill,) if kill_first else (psutil.Process.terminate,
                                                       psutil.Process.kill)
    for send in sends:
        left = [process for process in processes if still_running(process)]
        for process in left:
            with contextlib.suppress(psutil.Error):
                send(process)
        processes = _wait_gone(left, grace)


def _recorded(line: str) -> list[psutil.Process]:
    """The processes of a ``[[pid, start time], ...]`` JSON line that still run with that
    start time (a reused pid is another process)."""
    found = []
    for pid, started in json.loads(line):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == started:
                found.append(process)
    return found


SERVER_APP_HOSTS = ("flwr-simulation", "flwr-serverapp")  # Flower's TaskType commands


def _hosts_server_app(process: psutil.Process) -> bool:
    """Whether ``process`` (one of ours) runs Flower's ServerApp: its command is one of
    SERVER_APP_HOSTS (as a script, or run by the Python interpreter)."""
    try:
        return any(Path(arg).name in SERVER_APP_HOSTS for arg in process.cmdline()[:2])
    except psutil.Error:
        return False


def watchdog_main(flwr_homes: Sequence[str]) -> None:
    """The watchdog process (``python -m reefl.launcher [FLWR_HOME]``; see ``Watchdog``).

    Reads the processes to watch (``_recorded`` lines) and records every process below them
    every 0.5 s, while the tree is intact: SuperExec runs in a new session, and a dead
    parent's children (Ray's) are re-parented out of the tree. On "stop", or when its input
    closes because the launcher died (e.g. SIGKILLed), it stops them all: first SIGKILL to
    the ServerApp's process, so that a run being stopped cannot save one more round with
    the clients that are being stopped missing from it (measured: it did, and the resumed
    run then differed from an unstopped one); then SIGTERM to the
    watched ones (the SuperLink ends SuperExec, whose children follow and shut Ray down),
    CASCADE_GRACE for the rest to follow, then SIGTERM and SIGKILL to what is left; after
    the launcher's death it also removes the private FLWR_HOME.
    """
    roots: list[psutil.Process] = []
    known: set[psutil.Process] = set()
    ended, asked = threading.Event(), threading.Event()

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                asked.set()
                break
            roots.extend(_recorded(line))
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    print("ready", flush=True)
    while True:
        for root in [root for root in roots if still_running(root)]:
            with contextlib.suppress(psutil.Error):
                known.update([root, *root.children(recursive=True)])
        if ended.wait(0.5):
            break
    stop_processes([p for p in known if _hosts_server_app(p)], kill_first=True)
    stop_processes(roots)
    _wait_gone(list(known), CASCADE_GRACE)
    stop_processes(list(known))
    if not asked.is_set():
        for home in flwr_homes:
            shutil.rmtree(home, ignore_errors=True)


class Watchdog:
    """The launcher's end of ``watchdog_main``: a process in its own session (so neither
    Ctrl-C nor the launcher's death reaches it) that stops the processes it watches, and all
    they start, on ``stop()`` or as soon as the launcher dies."""

    def __init__(self, flwr_home: Path | None) -> None:
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "reefl.launcher", *([str(flwr_home)] if flwr_home else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != "ready\n":
            raise LaunchError("the process watchdog (python -m reefl.launcher) did not start")

    def watch(self, pid: int) -> None:
        """Watch ``pid``: a child of ours, not reaped yet, so its pid is not reused."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps([[pid, psutil.Process(pid).create_time()]]))
            self.process.stdin.write("\n")
            self.process.stdin.flush()

    def stop(self) -> None:
        """Stop every watched process now; return once they are stopped."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
        try:
            self.process.communicate(timeout=CASCADE_GRACE + 2 * STOP_GRACE + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _stop_process(process: subprocess.Popen[Any]) -> None:
    """Stop and reap a child of ours (Popen checks it was not reaped already, so its pid
    still is this process)."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalSuperLink:
    """A ``flower-superlink --simulation`` of our own, on a free port, with a private
    FLWR_HOME; ``stop()`` ends it and every process it started.

    Use as a context manager. ``adopt(process)`` adds another child process (the ``flwr
    run`` client) to what is stopped with it.
    """

    def __init__(self, flwr_home: Path, cwd: Path, log_path: Path, owns_home: bool = True) -> None:
        self.flwr_home = flwr_home
        self.owns_home = owns_home  # the watchdog deletes it if the launcher is killed
        self.cwd = cwd
        self.log_path = log_path
        self.bin_dir = _flower_bin_dir()
        self.env = {**flower_env(flwr_home, self.bin_dir), **ray_env(flwr_home)}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._children: list[subprocess.Popen[Any]] = []
        self._watchdog: Watchdog | None = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, port: int) -> list[str]:
        return [
            self._exe("flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip

    def _exe(self, name: str) -> str:
        found = shutil.which(name, path=self.env.get("PATH"))
        if found is None:
            raise LaunchError(f"'{name}' not found; install flwr[simulation] in this environment")
        return found

    def start(self, attempts: int = 3) -> None:
        """Start the watchdog and the SuperLink (on another free port if it does not come
        up); LaunchError, with everything stopped, if it never does."""
        for _ in range(attempts):
            self.port = free_port()
            command = self.command(self.port)
            write_flower_config(self.flwr_home, f"127.0.0.1:{self.port}")
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(  # noqa: S603
                    command,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
                )
            self.adopt(self.process)
            if self._wait_healthy():
                return
            self.stop()
        last = _tail(self.log_path, 1) or "no output"
        raise LaunchError(f"flower-superlink did not start: {last}")

    def adopt(self, process: subprocess.Popen[Any]) -> None:
        """Stop ``process`` (a child of ours), and all it starts, with the SuperLink."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.flwr_home if self.owns_home else None)
        self._children.append(process)
        self._watchdog.watch(process.pid)

    def _wait_healthy(self) -> bool:
        import httpx

        assert self.process is not None
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + SUPERLINK_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=0.5).is_success:
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Have the watchdog stop every process of the run, then reap our own children
        (stopping them here, should the watchdog have failed)."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        for child in self._children:
            _stop_process(child)
        self._children.clear()


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """Keep a second Ctrl-C from interrupting the cleanup (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the launch -----------------------------------------------------------------------------


def flwr_run_command(
    flwr: str, app_dir: Path, run_config_file: Path, federation: dict[str, Any]
) -> list[str]:
    """``flwr run <app> <connection> --stream --run-config <toml> --federation-config ...``."""
    return [
        flwr, "run", str(app_dir), CONNECTION, "--stream",
        "--run-config", str(run_config_file),
        "--federation-config", federation_arg(federation),
    ]  # fmt: skip


def _write_run_config(path: Path, overrides: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(overrides), encoding="utf-8")
    return path


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"reefl: {message}", flush=True)


def run_app(
    overrides: list[str],
    app_dir: Path | None = None,
    federation_overrides: Sequence[str] = (),
    quiet: bool = False,
    resume: Path | str | None = None,
    view: LogView | None = None,
) -> Path:
    """Run the Flower app once in a local simulation; return the run folder.

    With ``resume`` (a run folder; no ``overrides`` then) the run in that folder is
    continued from its checkpoint (``prepare_resume``), or, if it already finished, its
    table is printed and nothing is started.

    Flower's whole log goes to FLOWER_LOG in the run folder (appended to when resuming);
    ``view`` is what the user sees of it meanwhile (``reefl.progress``): by default one
    progress line, nothing with ``quiet``, which also leaves out reefl's own lines and the
    final table. A failed run's last log lines are printed unless the view showed them.

    Raises RunConfigError (before anything starts) for a bad config, RunFailed if the run
    did not write a final.json of its config (``run_failure``), LaunchError if Flower could
    not be started. Ctrl-C gives RunInterrupted once every started process is stopped.
    """
    if resume is None:
        prepared = prepare_run(overrides, app_dir, federation_overrides)
    else:
        prepared = prepare_resumable(overrides, resume, app_dir, federation_overrides)
        if finished_final(prepared.run_dir, prepared.digest) is not None:
            _say(f"run {prepared.run_dir} has already finished", quiet)
            _print_final(prepared, quiet)
            return prepared.run_dir
    run_dir = prepared.run_dir
    _say(f"run folder {run_dir}", quiet)
    check_output_dir(run_dir.parent)
    if _is_reefl_app(prepared.app_dir):
        _check_pretrained(prepared.config, quiet)
        _prepare_data(prepared.config, quiet)
    _say(f"app {prepared.app_dir}; simulation {federation_arg(prepared.federation)}", quiet)
    if view is None:
        view = LogView() if quiet else ProgressView()
    log = FlowerLog(run_dir / FLOWER_LOG, view, _num_rounds(prepared.config),
                    append=resume is not None)
    started = time.time()
    with log:
        try:
            returncode, superlink_log = _run_flower(prepared, log)
        except KeyboardInterrupt:
            raise RunInterrupted(run_dir) from None
    reason = run_failure(prepared, returncode, started)
    if reason is not None:
        _show_failure(log, superlink_log if returncode != 0 else "")
        raise RunFailed(f"run failed ({reason}); run folder {run_dir}; Flower's log {log.path}",
                        run_dir)
    _print_final(prepared, quiet)
    _say(f"run folder {run_dir}", quiet)
    return run_dir


def prepare_resumable(overrides: Sequence[str], run_dir: Path | str,
                      app_dir: Path | str | None = None,
                      federation_overrides: Sequence[str] = ()) -> PreparedRun:
    """``prepare_resume``, after checking that no other run config was asked for, and that
    the folder can be continued: it finished, or it has a checkpoint."""
    if any(overrides):
        raise RunConfigError("--resume runs the folder's own config.json; --run-config and "
                             "--preset cannot be given with it (--federation-config can)")
    prepared = prepare_resume(run_dir, app_dir, federation_overrides)
    if finished_final(prepared.run_dir, prepared.digest) is None and not (
            prepared.run_dir / CHECKPOINT_FILE).is_file():
        raise RunConfigError(f"--resume: {prepared.run_dir} has no {CHECKPOINT_FILE} (no "
                             "round was saved), so there is nothing to resume")
    return prepared


def _num_rounds(config: dict[str, Any]) -> int | None:
    """The run config's num-server-rounds, if it has a whole number of them."""
    rounds = config.get("num-server-rounds")
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None


def _show_failure(log: FlowerLog, superlink_log: str) -> None:
    """After a failed run, on stderr: the last lines of Flower's log (unless its view showed
    every line) and ``superlink_log``, if any."""
    if log.tail() and not log.view.shows_log:
        sys.stderr.write(f"--- Flower's log, last lines (all of it: {log.path}) ---\n"
                         f"{log.tail()}\n")
    if superlink_log:
        sys.stderr.write(f"--- flower-superlink output (last lines) ---\n{superlink_log}\n")


def _run_flower(prepared: PreparedRun, log: FlowerLog) -> tuple[int, str]:
    """Start a private SuperLink, run ``flwr run`` against it (every line of its output to
    ``log``) and stop every process again, also when interrupted. Returns flwr run's exit
    code and the last lines of the SuperLink's log. The private FLWR_HOME, which also holds
    the run's Ray session (``ray_env``), is removed at the end."""
    with tempfile.TemporaryDirectory(prefix="reefl-flwr-", dir=private_home_parent(),
                                     ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        superlink = LocalSuperLink(home, Path.cwd(), home / "superlink.log")
        try:
            superlink.start()
            command = flwr_run_command(
                superlink._exe("flwr"),
                stage_app(prepared.app_dir, home / "app"),
                _write_run_config(home / "run-config.toml", prepared.overrides),
                prepared.federation,
            )
            flwr_process = subprocess.Popen(  # noqa: S603
                command,
                cwd=Path.cwd(),
                env=superlink.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
            superlink.adopt(flwr_process)
            assert flwr_process.stdout is not None
            for line in flwr_process.stdout:
                log.write(line)
            returncode = flwr_process.wait()
        except BaseException:
            log.view.note("stopping Flower processes...")
            with _no_sigint():
                superlink.stop()
            raise
        with _no_sigint():
            superlink.stop()
        return returncode, _tail(superlink.log_path, 40)


def run_failure(prepared: PreparedRun, returncode: int, started: float) -> str | None:
    """Why the run failed, or None. ``flwr run`` may exit 0 although the ServerApp failed,
    so success is also a final.json written after ``started`` (time.time()) whose
    ``config_digest``, once the ServerApp writes one, is that of the config sent."""
    if returncode != 0:
        return f"flwr run exited with {returncode}"
    path = prepared.run_dir / "final.json"
    try:
        written = path.stat().st_mtime
        final = json.loads(path.read_text())
    except FileNotFoundError:
        return "no final.json written"
    except (OSError, ValueError) as err:
        return f"final.json unreadable: {_one_line(str(err))}"
    if written < started - 1:
        return "no final.json written by this run"
    digest = final.get("config_digest") if isinstance(final, dict) else None
    if digest is not None and digest != prepared.digest:
        return f"final.json has config_digest {digest}, not {prepared.digest} of this run's config"
    return None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, raised once every Flower process is stopped; ``hint`` says how
    the run can go on."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir

    def hint(self) -> str:
        if (self.run_dir / CHECKPOINT_FILE).is_file():
            return f"continue it with `reefl run --resume {self.run_dir}`"
        return f"no round was saved in {self.run_dir}, so it cannot be resumed"


def check_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and write (then remove) a probe file in it, so that a folder the
    run cannot write stops it with one line before Flower starts, not at the end."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".reefl-probe-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as err:
        raise RunConfigError(f"output-dir '{output_dir}' cannot be written: "
                             f"{err.strerror or err}") from None


def _prepare_data(config: dict[str, Any], quiet: bool) -> None:
    """Load, decode (into the on-disk cache, once per machine) and partition the run's data
    now, so that bad data stops the run with one line before any Flower process starts,
    and the Flower processes only memory-map what is already there."""
    from reefl.config import RunConfig
    from reefl.data import DataError, build_federated_data

    cfg = RunConfig.from_flat(config)
    started = time.monotonic()
    try:
        data = build_federated_data(cfg.data_options)
    except DataError as err:
        raise RunConfigError(_one_line(f"dataset: {err}")) from None
    sizes = sorted(len(shard) for shard in data.client_indices)
    _say(f"data {cfg.dataset}: {data.spec.kind}, {data.num_classes} classes, "
         f"{len(sizes)} clients ({data.partitioner}; {sizes[0]}-{sizes[-1]} examples each), "
         f"{len(data.test_indices)} test examples ({time.monotonic() - started:.1f} s)", quiet)


def _check_pretrained(config: dict[str, Any], quiet: bool) -> None:
    """The checkpoint of ``pretrained``, now: a named one (official/timm) downloaded into the
    cache with a progress bar, so the Flower processes find it there instead of all fetching
    it; and its header read (``check_checkpoint_file``), so that a file that is no checkpoint
    stops the run with one line instead of a traceback in the middle of it."""
    pretrained = str(config.get("pretrained") or "")
    if not pretrained:
        return
    from reefl.config import PRETRAINED_SOURCES
    from reefl.models.checkpoints import CheckpointError, check_checkpoint_file, resolve_checkpoint

    try:
        path = resolve_checkpoint(pretrained, str(config["model"]))
        check_checkpoint_file(path)
    except (CheckpointError, OSError) as err:  # e.g. no network
        raise RunConfigError(_one_line(f"pretrained: {err}")) from None
    if pretrained in PRETRAINED_SOURCES:
        _say(f"pretrained checkpoint {path}", quiet)


def _print_final(prepared: PreparedRun, quiet: bool) -> None:
    """reefl's per-exit table of final.json, or the raw JSON for another app."""
    if quiet:
        return
    final = json.loads((prepared.run_dir / "final.json").read_text())
    if _is_reefl_app(prepared.app_dir):
        from reefl.report import format_final_table

        print(format_final_table(final), flush=True)
    else:
        print(json.dumps(final, indent=2), flush=True)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


if __name__ == "__main__":
    watchdog_main(sys.argv[1:])
