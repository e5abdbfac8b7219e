"""``reefl run``: the Flower app in a local simulation, through Flower's own ``flwr run``.

What it adds on top of ``flwr run <app-dir>``:

* the run config is resolved and checked before any Flower process starts
  (``run_config``), and the run's data and pretrained checkpoint are prepared then, so bad
  data stops the run with one line;
* the simulation matches the run config (``resources``): one simulated SuperNode per client,
  the CPUs shared among the ClientApps of a round;
* every run gets its own short-lived SuperLink (``superlink``) with a private FLWR_HOME on a
  free loopback port, stopped again - with everything it spawned (SuperExec,
  flwr-simulation, Ray) - when the run ends, fails or is interrupted (``processes``); Ray's
  session folder is made inside that FLWR_HOME and removed with it;
* Flower's whole log goes to ``flower.log`` in the run folder; the terminal shows one
  progress line instead (``outputs.progress``), or the log itself with ``--verbose``.

``run_app`` is the function behind ``reefl run``; tests and ``reefl compare`` call it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from reefl.launch.app_files import stage_app
from reefl.launch.errors import (
    RunConfigError,
    RunFailed,
    RunInterrupted,
    one_line,
    resume_hint,
)
from reefl.launch.processes import ProcessGroup, TrackedProcess, flower_bin_dir, flower_env
from reefl.launch.resources import federation_arg, federation_config
from reefl.launch.run_config import (
    PreparedRun,
    finished_final,
    is_reefl_app,
    prepare_resumable,
    prepare_run,
)
from reefl.launch.superlink import SuperLink
from reefl.launch.watchdog import hosts_server_app, still_running
from reefl.outputs.progress import FlowerLog, LogView, ProgressView
from reefl.outputs.run_folder import FLOWER_LOG

CONNECTION = "reefl-local"


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


# Ray (2.55) gives its one-node "cluster" the machine's LAN address, and its GCS server,
# raylets, workers (the ClientApps) and agents listen on every interface; Ray has no
# authentication. With "cluster" support off (the switch Ray keeps for Windows and macOS,
# ray_constants.ENABLE_RAY_CLUSTER, read on every platform) the node's address is the
# loopback one and every server binds to it (measured: no other listening socket).
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def ray_env(flwr_home: Path) -> dict[str, str]:
    """Ray's environment for the Flower processes of a run: RAY_LOOPBACK, so that nothing of
    the simulation listens beyond this host; and ``RAY_TMPDIR`` = ``flwr_home``, so that the
    Ray session the simulation starts (its ``ray/session_*`` folder, ~0.7 MB, which Ray
    leaves behind) is made in the run's private FLWR_HOME and removed with it, and no other
    session (another user's, another run's) is touched; not where Ray's socket paths would
    get too long there (Ray's default place then)."""
    if len(str(flwr_home)) + len(RAY_SOCKET_TAIL) > MAX_SOCKET_PATH:
        return dict(RAY_LOOPBACK)
    return {**RAY_LOOPBACK, "RAY_TMPDIR": str(flwr_home)}


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


def say(message: str, quiet: bool = False) -> None:
    """``reefl: <message>`` on stdout, unless ``quiet``."""
    if not quiet:
        print(f"reefl: {message}", flush=True)


def run_app(
    overrides: list[str],
    app_dir: Path | None = None,
    federation_overrides: Sequence[str] = (),
    quiet: bool = False,
    resume: Path | str | None = None,
    view: LogView | None = None,
    table: bool = True,
) -> Path:
    """Run the Flower app once in a local simulation; return the run folder.

    With ``resume`` (a run folder; no ``overrides`` then) the run in that folder is
    continued from its checkpoint (``prepare_resume``), or, if it already finished, its
    table is printed and nothing is started.

    Flower's whole log goes to FLOWER_LOG in the run folder (appended to when resuming);
    ``view`` is what the user sees of it meanwhile (``reefl.outputs.progress``): by default one
    progress line; nothing with ``quiet``, which also leaves out reefl's own lines. The final
    table is printed at the end unless ``table`` is False. A failed run's last log lines are
    printed unless the view showed them.

    Raises RunConfigError (before anything starts) for a bad config, RunFailed if the run
    did not write a final.json of its config (``run_failure``), LaunchError if Flower could
    not be started. Ctrl-C gives RunInterrupted once every started process is stopped.
    """
    begun = time.monotonic()
    if resume is None:
        prepared = prepare_run(overrides, app_dir, federation_overrides)
    else:
        prepared = prepare_resumable(overrides, resume, app_dir, federation_overrides)
        for warning in prepared.warnings:
            say(f"warning: {warning}", quiet)
        if finished_final(prepared.run_dir, prepared.digests) is not None:
            say(f"run {prepared.run_dir} has already finished", quiet)
            if table:
                print_final(prepared)
            return prepared.run_dir
    run_dir = prepared.run_dir
    federation = federation_config(prepared.config, prepared.federation_overrides)
    say(f"run folder {run_dir}", quiet)
    check_output_dir(run_dir.parent)
    if is_reefl_app(prepared.app_dir):
        _check_pretrained(prepared.config, quiet)
        _prepare_data(prepared.config, quiet)
    say(f"app {prepared.app_dir}; simulation {federation_arg(federation)}", quiet)
    if view is None:
        view = LogView() if quiet else ProgressView()
    log = FlowerLog(run_dir / FLOWER_LOG, view, num_rounds(prepared.config),
                    append=resume is not None)
    started = time.time()
    with log:
        try:
            returncode, superlink_log = _run_flower(prepared, federation, log)
        except KeyboardInterrupt:
            raise RunInterrupted(run_dir) from None
    reason = run_failure(prepared, returncode, started)
    if reason is not None:
        _show_failure(log, superlink_log if returncode != 0 else "")
        raise RunFailed(f"run failed ({reason}); Flower's log {log.path}; "
                        f"{resume_hint(run_dir)}", run_dir)
    if table:
        print_final(prepared)
    say(f"run folder {run_dir} · {time.monotonic() - begun:.0f} s in all", quiet)
    return run_dir


def num_rounds(config: dict[str, Any]) -> int | None:
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


def _run_flower(prepared: PreparedRun, federation: dict[str, Any], log: FlowerLog
                ) -> tuple[int, str]:
    """Start a private SuperLink, run ``flwr run`` against it (every line of its output to
    ``log``) and stop every process again, also when interrupted. Returns flwr run's exit
    code and the last lines of the SuperLink's log. The private FLWR_HOME, which also holds
    the run's Ray session (``ray_env``), is removed at the end."""
    with tempfile.TemporaryDirectory(prefix="reefl-flwr-", dir=private_home_parent(),
                                     ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        env = {**flower_env(home, flower_bin_dir()), **ray_env(home)}
        group = ProcessGroup(env, Path.cwd(), remove_on_death=home)
        superlink = SuperLink(group, home, home, CONNECTION, simulation=True)
        try:
            superlink.start()
            command = flwr_run_command(
                superlink.exe("flwr"),
                stage_app(prepared.app_dir, home / "app"),
                _write_run_config(home / "run-config.toml", prepared.overrides),
                federation,
            )
            flwr_run = group.spawn("flwr-run", command, None, echo=log)
            returncode = wait_for_flower(flwr_run, group, prepared.run_dir / "final.json")
            if returncode == SERVER_APP_DIED:
                log.view.stopping()
                print("reefl: the ServerApp's process ended without finishing the run; "
                      "stopping Flower processes...", file=sys.stderr, flush=True)
        except BaseException:
            log.view.stopping()
            log.view.note("stopping Flower processes...")
            group.stop()
            raise
        group.stop()
        assert superlink.process is not None
        return returncode, superlink.process.log_tail(40)


SERVER_APP_DEAD_AFTER = 2.0  # seconds after the ServerApp ended without final.json
FINISH_GRACE = 30.0  # seconds flwr run gets to end after the ServerApp finished the run
SERVER_APP_DIED = -1  # what wait_for_flower returns when the ServerApp died mid-run


def wait_for_flower(flwr_run: TrackedProcess, group: ProcessGroup, final: Path,
                    poll: float = 0.5) -> int:
    """``flwr run``'s exit code, or SERVER_APP_DIED within SERVER_APP_DEAD_AFTER seconds once
    the ServerApp's process (``flwr-simulation``) has ended without writing ``final``:
    ``flwr run`` itself only notices after a minute or more (it waits on the run's status),
    and by then the user has long wondered. A ServerApp that finished gives flwr run
    FINISH_GRACE seconds to stream the last lines and end (0 after that)."""
    started = time.time()
    server_apps: list[psutil.Process] = []
    ended_at: float | None = None
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return flwr_run.wait(poll)
        server_apps = server_apps or [p for p in group.seen() if hosts_server_app(p)]
        if not server_apps or any(still_running(p) for p in server_apps):
            continue
        ended_at = ended_at or time.monotonic()
        finished = final.is_file() and final.stat().st_mtime >= started - 1
        waited = time.monotonic() - ended_at
        if (not finished and waited >= SERVER_APP_DEAD_AFTER) or waited >= FINISH_GRACE:
            return 0 if finished else SERVER_APP_DIED


def run_failure(prepared: PreparedRun, returncode: int, started: float) -> str | None:
    """Why the run failed, or None. ``flwr run`` may exit 0 although the ServerApp failed,
    so success is also a final.json written after ``started`` (time.time()) whose
    ``config_digest``, once the ServerApp writes one, is that of the config sent."""
    if returncode == SERVER_APP_DIED:
        return "the ServerApp's process ended without finishing the run"
    if returncode != 0:
        return f"flwr run exited with {returncode}"
    path = prepared.run_dir / "final.json"
    try:
        written = path.stat().st_mtime
        final = json.loads(path.read_text())
    except FileNotFoundError:
        return "no final.json written"
    except (OSError, ValueError) as err:
        return f"final.json unreadable: {one_line(str(err))}"
    if written < started - 1:
        return "no final.json written by this run"
    digest = final.get("config_digest") if isinstance(final, dict) else None
    if digest is not None and digest != prepared.digest:
        return f"final.json has config_digest {digest}, not {prepared.digest} of this run's config"
    return None


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
    and the Flower processes only memory-map what is already there. What the data cannot
    measure (``data_warnings``) is said on stderr, one line each, even with ``quiet``."""
    from reefl.config import RunConfig
    from reefl.data import DataError, build_federated_data
    from reefl.data.summary import data_warnings

    cfg = RunConfig.from_flat(config)
    started = time.monotonic()
    try:
        data = build_federated_data(cfg.data_options)
    except DataError as err:
        raise RunConfigError(one_line(f"dataset: {err}")) from None
    sizes = sorted(len(shard) for shard in data.client_indices)
    say(f"data {cfg.dataset}: {data.spec.kind}, {data.num_classes} classes, "
         f"{len(sizes)} clients ({data.partitioner}; {sizes[0]}-{sizes[-1]} examples each), "
         f"{len(data.test_indices)} test examples ({time.monotonic() - started:.1f} s)", quiet)
    for line in data_warnings(data, sampled=cfg.data_options.train_examples > 0):
        print(f"reefl: warning: {line}", file=sys.stderr, flush=True)


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
        raise RunConfigError(one_line(f"pretrained: {err}")) from None
    if pretrained in PRETRAINED_SOURCES:
        say(f"pretrained checkpoint {path}", quiet)


def print_final(prepared: PreparedRun) -> None:
    """reefl's per-exit table of final.json, or the raw JSON for another app."""
    final = json.loads((prepared.run_dir / "final.json").read_text())
    if is_reefl_app(prepared.app_dir):
        from reefl.outputs.run_folder import format_final_table

        print(format_final_table(final), flush=True)
    else:
        print(json.dumps(final, indent=2), flush=True)
