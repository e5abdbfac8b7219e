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
  interrupted.

``run_app`` is the function behind ``reefl run``; tests and ``reefl compare`` call it too.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
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


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` values, in order (later wins): key=value strings parsed exactly like
    ``flwr run --run-config`` parses them, and TOML files (presets: their ``base`` resolved).

    Unlike Flower, files and key=value strings may be mixed, and a string with no
    ``key=value`` pair in it is an error, not ignored.
    """
    from flwr.common.config import parse_config_args

    from reefl.presets import PresetError, read_config_file

    values: dict[str, Any] = {}
    for item in (item for item in overrides if item):
        if item.endswith(".toml"):
            try:
                values.update(read_config_file(Path(item)))
            except PresetError as err:
                raise RunConfigError(f"--run-config: {err}") from None
            continue
        if "=" not in item:
            raise RunConfigError(f"--run-config '{item}' is neither key=value nor a .toml file")
        try:
            values.update(parse_config_args([item]))
        except Exception as err:  # ValueError, click.ClickException: Flower's messages
            message = getattr(err, "message", None) or str(err)
            raise RunConfigError(f"--run-config: {_one_line(message)}") from None
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


def _validate(merged: dict[str, Any]) -> None:
    """``reefl.config.validate``, turned into the launcher's one-line error."""
    from reefl import config as reefl_config

    try:
        reefl_config.validate(merged)
    except reefl_config.ConfigError as err:
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


def prepare_run(
    overrides: Sequence[str],
    app_dir: Path | str | None = None,
    federation_overrides: Sequence[str] = (),
    cwd: Path | None = None,
    now: float | None = None,
) -> PreparedRun:
    """Merge, complete and validate the config; raises RunConfigError. Starts nothing."""
    cwd = (cwd or Path.cwd()).resolve()
    app = resolve_app_dir(app_dir, cwd)
    defaults = app_defaults(app)
    user = parse_overrides(overrides)
    if _is_reefl_app(app):
        user = pack_method_options(defaults, user)
    merged = merge_config(defaults, user)
    sent = dict(user)
    for key in ("output-dir", "run-name"):
        if key not in merged:
            raise RunConfigError(f"the app's [tool.flwr.app.config] has no '{key}' key")
    output_dir = (cwd / Path(str(merged["output-dir"])).expanduser()).resolve()
    run_name = str(merged["run-name"]).strip()
    if not run_name:
        run_name = _unique_run_name(output_dir, make_run_name(merged, now))
    if "/" in run_name or run_name in (".", ".."):
        raise RunConfigError(f"run-name must be a plain folder name, got '{run_name}'")
    sent["output-dir"] = merged["output-dir"] = str(output_dir)
    sent["run-name"] = merged["run-name"] = run_name
    if _is_reefl_app(app):
        _validate(merged)
    federation = federation_config(merged, federation_overrides)
    return PreparedRun(app, merged, sent, federation, output_dir / run_name)


# -- federation (simulation) settings -------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may use (affinity-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_federation(config: dict[str, Any], cpus: int | None = None) -> dict[str, Any]:
    """Simulation settings that match the run config.

    * ``num-supernodes = num-clients``: one simulated SuperNode per client.
    * ``client-resources-num-cpus``: CPUs per ClientApp (Flower's default is 2, i.e. one
      ClientApp at a time on a 2-core machine). Ray runs ``cpus // n`` ClientApps in
      parallel and sets ``OMP_NUM_THREADS=n`` in each, which is torch's thread count. We
      give each of the clients of one round an equal share, at least 1 CPU: on 2 cores that
      is 2 ClientApps with 1 thread each, measured ~2x the throughput of 1 x 2 threads for
      the small ViT (Flower only accepts whole CPUs here).
    """
    cpus = cpus or available_cpus()
    federation: dict[str, Any] = {}
    clients = config.get("num-clients")
    if isinstance(clients, int) and not isinstance(clients, bool) and clients > 0:
        federation["num-supernodes"] = clients
        fraction = config.get("fraction-train", 1.0)
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            fraction = 1.0
        per_round = max(1, math.ceil(fraction * clients))
        federation["client-resources-num-cpus"] = max(1, cpus // per_round)
    else:
        federation["client-resources-num-cpus"] = 1
    return federation


def federation_config(config: dict[str, Any], user: Sequence[str] = ()) -> dict[str, Any]:
    """Default simulation settings, then the user's ``--federation-config`` on top."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    items = [item for item in user if item]
    for item in items:
        if "=" not in item:
            raise RunConfigError(f"--federation-config '{item}' is not key=value")
    try:
        parsed = dict(parse_config_args(items or None))
    except Exception as err:
        message = getattr(err, "message", None) or str(err)
        raise RunConfigError(f"--federation-config: {_one_line(message)}") from None
    merged = {**default_federation(config), **parsed}
    try:  # the same check `flwr run` makes, but before anything starts
        simulation_config_from_json({k.replace("-", "_"): v for k, v in merged.items()})
    except (ValueError, TypeError) as err:
        raise RunConfigError(f"--federation-config: {_one_line(str(err))}") from None
    return merged


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_flower_config(flwr_home: Path, port: int) -> Path:
    """A private ``$FLWR_HOME/config.toml`` whose default connection is our SuperLink."""
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )
    return path


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, start time) of a live process from /proc; None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[2]), fields[19]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


class _ProcessTree:
    """Remembers every process below some roots (and their process groups), on Linux.

    The SuperLink starts SuperExec in a new session, SuperExec starts flwr-simulation,
    which starts Ray (gcs_server, raylet, agents, workers) in SuperExec's process group.
    A dead parent's children are re-parented, so the tree is recorded while it is intact
    (``snapshot`` every 0.5 s) and the process groups catch what was started in between.
    The launcher's own process group is never included.
    """

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.known: dict[int, str] = {}  # pid -> start time (guards against pid reuse)
        self.groups: set[int] = set()
        self.enabled = sys.platform.startswith("linux") and Path("/proc/self/stat").exists()
        self._lock = threading.Lock()

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.append(pid)
        self.snapshot()

    def snapshot(self) -> bool:
        """Record the current tree; True if something new was seen."""
        if not self.enabled:
            return False
        table = _proc_table()
        children: dict[int, list[int]] = collections.defaultdict(list)
        for pid, (ppid, _pgid, _start) in table.items():
            children[ppid].append(pid)
        with self._lock:
            before = (len(self.known), len(self.groups))
            stack = [pid for pid in self.roots if pid in table]
            while stack:
                pid = stack.pop()
                self.known[pid] = table[pid][2]
                self.groups.add(table[pid][1])
                stack.extend(children.get(pid, ()))
            self.groups.discard(os.getpgrp())
            return (len(self.known), len(self.groups)) != before

    def state(self) -> str:
        with self._lock:
            return json.dumps({"pids": {str(k): v for k, v in self.known.items()},
                               "groups": sorted(self.groups)})  # fmt: skip

    def alive(self) -> list[int]:
        """Known processes still running, plus anything else in their process groups."""
        if not self.enabled:
            return []
        with self._lock:
            known, groups = dict(self.known), set(self.groups)
        return [
            pid
            for pid, (_ppid, pgid, start) in _proc_table().items()
            if pid != os.getpid() and (known.get(pid) == start or pgid in groups)
        ]


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(tree: _ProcessTree, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = tree.alive()
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _terminate_tree(tree: _ProcessTree, grace: float = STOP_GRACE) -> None:
    """SIGTERM what is left of the tree, then SIGKILL (Ray's agents ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = tree.alive()
        if not left:
            return
        _signal_all(left, sig)
        _wait_gone(tree, grace)


# Runs in its own session and reads the tree's state from a pipe. If the pipe closes
# without "done" (the launcher was killed, e.g. SIGKILL by a test timeout), it stops the
# processes the launcher last reported (and removes the private FLWR_HOME), so nothing
# of the run is left behind.
_WATCHDOG = r"""
import json, os, shutil, signal, sys, time
def stat(pid):
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    f = raw[raw.rfind(")") + 2:].split()
    return None if f[0] in ("Z", "X") else (int(f[2]), f[19])
def alive(state):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            s = stat(int(entry))
            if s and (state["pids"].get(entry) == s[1] or s[0] in state["groups"]):
                found.append(int(entry))
    return found
signal.signal(signal.SIGINT, signal.SIG_IGN)
state = {"pids": {}, "groups": []}
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    state = json.loads(line)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in alive(state):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while alive(state) and time.monotonic() < deadline:
        time.sleep(0.1)
if len(sys.argv) > 1:
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class LocalSuperLink:
    """A ``flower-superlink --simulation`` of our own, on a free port, with a private
    FLWR_HOME; ``stop()`` ends it and every process it started.

    Use as a context manager. ``adopt(pid)`` adds another process (the ``flwr run``
    client) to what is watched and stopped.
    """

    def __init__(self, flwr_home: Path, cwd: Path, log_path: Path, owns_home: bool = True) -> None:
        self.flwr_home = flwr_home
        self.owns_home = owns_home  # the watchdog deletes it if the launcher is killed
        self.cwd = cwd
        self.log_path = log_path
        self.bin_dir = _flower_bin_dir()
        self.env = flower_env(flwr_home, self.bin_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.tree = _ProcessTree()
        self.port = 0
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watchdog: subprocess.Popen[str] | None = None

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
        for attempt in range(attempts):
            self._start_watchdog()
            self.port = _free_port()
            command = self.command(self.port)
            write_flower_config(self.flwr_home, self.port)
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
            self.adopt(self.process.pid)
            self._start_watcher()
            if self._wait_healthy():
                return
            self.stop()
            if attempt == attempts - 1:
                raise LaunchError(
                    f"flower-superlink did not start: {_tail(self.log_path, 1) or 'no output'}"
                )

    def adopt(self, pid: int) -> None:
        self.tree.add_root(pid)
        self._report()

    def _start_watchdog(self) -> None:
        if not self.tree.enabled or self._watchdog is not None:
            return
        self._watchdog = subprocess.Popen(  # noqa: S603
            [sys.executable, "-c", _WATCHDOG, *([str(self.flwr_home)] if self.owns_home else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def _report(self, message: str | None = None) -> None:
        """Send the tree's state (or "done") to the watchdog."""
        if self._watchdog is None or self._watchdog.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._watchdog.stdin.write((message or self.tree.state()) + "\n")
            self._watchdog.stdin.flush()

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

    def _start_watcher(self) -> None:
        if self._watcher is not None:
            return
        self._watch_stop.clear()

        def watch() -> None:
            while not self._watch_stop.wait(0.5):
                if self.tree.snapshot():
                    self._report()

        self._watcher = threading.Thread(target=watch, name="reefl-superlink-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """SIGTERM the SuperLink (it terminates SuperExec, whose children follow their
        parent), then SIGTERM and finally SIGKILL whatever of the tree is left."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        if self.tree.snapshot():
            self._report()
        process = self.process
        if process is not None:
            _stop_process(process)
            _wait_gone(self.tree, CASCADE_GRACE)  # flwr-simulation shuts Ray down
            _terminate_tree(self.tree)  # e.g. Ray processes of an interrupted run
            if not self.tree.enabled:  # no /proc: at least the SuperLink's group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            self.process = None
        if self._watchdog is not None:
            self._report("done")
            with contextlib.suppress(OSError, ValueError):
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
            try:
                self._watchdog.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None


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
) -> Path:
    """Run the Flower app once in a local simulation; return the run folder.

    Raises RunConfigError (before anything starts) for a bad config, RunFailed if the run
    did not write ``final.json``, LaunchError if Flower could not be started. Ctrl-C
    (KeyboardInterrupt) propagates after every started process has been stopped.
    """
    prepared = prepare_run(overrides, app_dir, federation_overrides)
    run_dir = prepared.run_dir
    _say(f"run folder {run_dir}", quiet)
    if _is_reefl_app(prepared.app_dir) and prepared.config.get("dataset") != "embedded-mnist":
        _prepare_data(prepared.config, quiet)  # the bundled digits need no decoding or check
    _fetch_checkpoint(prepared.config, quiet)
    _say(
        f"app {prepared.app_dir}; simulation {federation_arg(prepared.federation)}",
        quiet,
    )
    started = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with tempfile.TemporaryDirectory(prefix="reefl-flwr-") as tmp:
        home = Path(tmp)
        superlink = LocalSuperLink(home, Path.cwd(), home / "superlink.log")
        flwr_process: subprocess.Popen[str] | None = None
        try:
            superlink.start()
            command = flwr_run_command(
                superlink._exe("flwr"),
                prepared.app_dir,
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
            superlink.adopt(flwr_process.pid)
            assert flwr_process.stdout is not None
            for line in flwr_process.stdout:
                tail.append(line)
                if not quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            returncode = flwr_process.wait()
        except BaseException:
            if not quiet:
                print("reefl: stopping Flower processes...", file=sys.stderr, flush=True)
            with _no_sigint():
                _stop_process(flwr_process)
                superlink.stop()
            raise
        with _no_sigint():
            superlink.stop()
            superlink_log = _tail(superlink.log_path, 40)
    final = run_dir / "final.json"
    if returncode != 0 or not final.is_file() or final.stat().st_mtime < started - 1:
        if quiet:
            sys.stderr.write("".join(tail))
        if superlink_log and returncode != 0:
            sys.stderr.write(f"--- flower-superlink output (last lines) ---\n{superlink_log}\n")
        reason = f"flwr run exited with {returncode}" if returncode else "no final.json written"
        raise RunFailed(f"run failed ({reason}); run folder {run_dir}", run_dir)
    if not quiet:
        print(_final_table(prepared.app_dir, final), flush=True)
        _say(f"run folder {run_dir}", quiet)
    return run_dir


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


def _fetch_checkpoint(config: dict[str, Any], quiet: bool) -> None:
    """Download a checkpoint named by ``pretrained`` (official/timm) into the cache now, with
    a progress bar, so the Flower processes find it there instead of all fetching it."""
    from reefl.config import PRETRAINED_SOURCES

    if config.get("pretrained") not in PRETRAINED_SOURCES:
        return
    from reefl.models.pretrained import CheckpointError, resolve_checkpoint

    try:
        path = resolve_checkpoint(str(config["pretrained"]), str(config["model"]))
    except (CheckpointError, OSError) as err:  # e.g. no network
        raise RunConfigError(_one_line(f"pretrained: {err}")) from None
    _say(f"pretrained checkpoint {path}", quiet)


def _stop_process(process: subprocess.Popen[str] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _final_table(app_dir: Path, final_path: Path) -> str:
    """reefl's per-exit table, or the raw JSON for another app."""
    final = json.loads(final_path.read_text())
    if _is_reefl_app(app_dir):
        from reefl.report import format_final_table

        return format_final_table(final)
    return json.dumps(final, indent=2)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _one_line(message: str) -> str:
    return " ".join(str(message).split())
