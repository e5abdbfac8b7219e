"""The one process tracker of every launch (``reefl run``, ``deploy``, ``compare``).

A ``ProcessGroup`` starts Flower's processes, each in its own session (so a Ctrl-C in the
terminal reaches only reefl, which stops things in order), records every descendant while
they run (psutil keeps each one's start time, so a reused pid is never signalled, and a
child re-parented after its parent died is still known), and stops them all by pid - never
by name. A watchdog process (``reefl.launch.watchdog``) watches the same processes and stops
them should reefl itself die.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

import psutil

from reefl.launch.watchdog import STOP_GRACE, Watchdog, still_running, stop_processes

REFRESH_INTERVAL = 0.5  # how often the process trees are recorded

# Environment every Flower process of a launch gets.
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


def flower_bin_dir() -> Path | None:
    """The scripts folder of the Python running this (where flwr, flower-superlink live)."""
    bin_dir = Path(sys.executable).parent
    exe = "flower-superlink.exe" if os.name == "nt" else "flower-superlink"
    return bin_dir if (bin_dir / exe).exists() else None


def flower_env(flwr_home: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process of a launch."""
    env = os.environ.copy()
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(ENV_FORCED)
    env["FLWR_HOME"] = str(flwr_home)
    if bin_dir is not None:  # SuperLink/SuperExec find their children on PATH
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (default: the loopback interface) that nobody listens on now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LineSink(Protocol):
    """Where a process's output lines are copied (a terminal stream, a ``FlowerLog``)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class TrackedProcess:
    """One started command, its log file (if any), and every descendant seen while it ran.

    The output goes to ``log_path``; with ``echo`` it is also copied there line by line (with
    ``log_path`` None, only there).
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path,
                 log_path: Path | None, echo: LineSink | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._copier: threading.Thread | None = None
        with contextlib.ExitStack() as files:
            log: IO[bytes] | int = subprocess.DEVNULL
            if log_path is not None and echo is None:
                log = files.enter_context(log_path.open("ab"))
            self.popen = subprocess.Popen(  # noqa: S603
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if echo is not None:
            self._copier = threading.Thread(target=self._copy_output, args=(echo,),
                                            name=f"reefl-{name}-output", daemon=True)
            self._copier.start()
        self.refresh()

    def _copy_output(self, echo: LineSink) -> None:
        """Write the process's output to its log file (if any) and to ``echo``, by line."""
        assert self.popen.stdout is not None
        with contextlib.ExitStack() as files:
            log = (files.enter_context(self.log_path.open("a", encoding="utf-8"))
                   if self.log_path is not None else None)
            for raw in self.popen.stdout:
                line = raw.decode("utf-8", errors="replace")
                if log is not None:
                    log.write(line)
                    log.flush()
                echo.write(line)
                echo.flush()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def refresh(self) -> None:
        """Remember the process and its current descendants."""
        try:
            root = psutil.Process(self.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        with self._lock:
            for proc in family:
                self._seen.setdefault(proc.pid, proc)

    def known(self) -> list[psutil.Process]:
        """The process and every descendant seen while it ran."""
        with self._lock:
            return list(self._seen.values())

    def alive(self) -> list[psutil.Process]:
        """The remembered processes that still run (zombies excluded)."""
        with self._lock:
            procs = list(self._seen.values())
        return [proc for proc in procs if still_running(proc)]

    def stop(self, kill_first: bool = False) -> None:
        """Stop this process and everything it started (``stop_tracked``)."""
        stop_tracked([self], kill_first)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the process ended, with all its output copied."""
        code = self.popen.wait(timeout)
        if self._copier is not None:
            self._copier.join()
        return code

    def reap(self, timeout: float) -> None:
        """Collect the exit status of the process itself and the rest of its output."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(max(timeout, 0.0))
        if self._copier is not None and self.popen.poll() is not None:
            self._copier.join(STOP_GRACE)

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().rstrip().splitlines()[-lines:])


def stop_tracked(processes: Sequence[TrackedProcess], kill_first: bool = False) -> None:
    """Stop every process of every tree at once (``stop_processes``: by pid, each checked
    against its start time), then reap the started processes themselves."""
    for process in processes:
        process.refresh()
    stop_processes([proc for process in processes for proc in process.alive()],
                   kill_first=kill_first)
    for process in processes:
        process.reap(STOP_GRACE)


class ProcessGroup:
    """Every process of one launch: started with ``spawn`` (environment ``env``, working
    folder ``cwd``), their trees recorded twice a second, all stopped by ``stop``.

    The first ``spawn`` starts the watchdog, which stops everything should this process die
    and then also removes ``remove_on_death`` (a private FLWR_HOME or work folder). Use as a
    context manager.
    """

    def __init__(self, env: dict[str, str], cwd: Path, remove_on_death: Path | None = None
                 ) -> None:
        self.env = env
        self.cwd = cwd
        self.remove_on_death = remove_on_death
        self.processes: list[TrackedProcess] = []
        self._watchdog: Watchdog | None = None
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, command: list[str], log_path: Path | None,
              echo: LineSink | None = None) -> TrackedProcess:
        """Start ``command``, tracked here (to stop it alone) and by the watchdog."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.remove_on_death)
            self._start_refresher()
        process = TrackedProcess(name, command, self.env, self.cwd, log_path, echo)
        self.processes.append(process)
        self._watchdog.watch(process.pid)
        return process

    def seen(self) -> list[psutil.Process]:
        """Every process of the group seen so far (started ones and their descendants)."""
        for process in list(self.processes):
            process.refresh()
        return [proc for process in self.processes for proc in process.known()]

    def _start_refresher(self) -> None:
        """Record every process tree twice a second, so that a grandchild whose parent
        died (and which was re-parented) is still known and stopped."""
        self._stop_refresh.clear()

        def refresh() -> None:
            while not self._stop_refresh.wait(REFRESH_INTERVAL):
                for process in list(self.processes):
                    if process.running():
                        process.refresh()

        self._refresher = threading.Thread(target=refresh, name="reefl-process-refresh",
                                           daemon=True)
        self._refresher.start()

    def stop(self) -> None:
        """Stop every process of the group: the watchdog first (it stops Flower's ServerApp
        before anything else, then the rest), then whatever is still known here; reap the
        started processes. A second Ctrl-C does not interrupt it."""
        with no_sigint():
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            stop_tracked(self.processes)
            self._stop_refresh.set()
            if self._refresher is not None:
                self._refresher.join()
                self._refresher = None


@contextlib.contextmanager
def no_sigint() -> Iterator[None]:
    """Keep a second Ctrl-C from interrupting the cleanup (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
