"""The watchdog: a separate process that stops a launch's Flower processes should reefl
itself die (SIGKILL, a crash), and on request.

``Watchdog`` starts it (``python -m reefl.launch.watchdog [FOLDER]``) in its own session, so
neither Ctrl-C nor reefl's death reaches it, and tells it, line by line on its stdin, which
processes to watch (``[[pid, start time]]``). When its stdin says "stop", or closes because
reefl died, it stops every process it saw below them; after reefl's death it also removes
FOLDER (a private FLWR_HOME or work folder).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from reefl.launch.errors import LaunchError

STOP_GRACE = 5.0  # seconds a process gets between SIGTERM and SIGKILL
CASCADE_GRACE = 2.0  # seconds SuperExec's children get to follow the SuperLink out
SERVER_APP_HOSTS = ("flwr-simulation", "flwr-serverapp")  # Flower's TaskType commands


def still_running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs: same pid *and* start time (psutil compares both, so a
    reused pid is not ours), and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(processes: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
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
        processes = wait_gone(left, grace)


def recorded(line: str) -> list[psutil.Process]:
    """The processes of a ``[[pid, start time], ...]`` JSON line that still run with that
    start time (a reused pid is another process)."""
    found = []
    for pid, started in json.loads(line):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == started:
                found.append(process)
    return found


def hosts_server_app(process: psutil.Process) -> bool:
    """Whether ``process`` (one of ours) runs Flower's ServerApp: its command is one of
    SERVER_APP_HOSTS (as a script, or run by the Python interpreter)."""
    try:
        return any(Path(arg).name in SERVER_APP_HOSTS for arg in process.cmdline()[:2])
    except psutil.Error:
        return False


def watchdog_main(folders: Sequence[str]) -> None:
    """The watchdog process's loop.

    Reads the processes to watch (``recorded`` lines) and records every process below them
    every 0.5 s, while the tree is intact: SuperExec runs in a new session, and a dead
    parent's children (Ray's) are re-parented out of the tree. On "stop", or when its input
    closes, it stops them all: first SIGKILL to the ServerApp's process, so that a run being
    stopped cannot save one more round with the clients that are being stopped missing from
    it (measured: it did, and the resumed run then differed from an unstopped one); then
    SIGTERM to the watched ones (the SuperLink ends SuperExec, whose children follow and shut
    Ray down), CASCADE_GRACE for the rest to follow, then SIGTERM and SIGKILL to what is
    left; after reefl's death it also removes ``folders``.
    """
    roots: list[psutil.Process] = []
    known: set[psutil.Process] = set()
    ended, asked = threading.Event(), threading.Event()

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                asked.set()
                break
            roots.extend(recorded(line))
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    print("ready", flush=True)
    while True:
        for root in [root for root in roots if still_running(root)]:
            with contextlib.suppress(psutil.Error):
                known.update([root, *root.children(recursive=True)])
        if ended.wait(0.5):
            break
    stop_processes([p for p in known if hosts_server_app(p)], kill_first=True)
    stop_processes(roots)
    wait_gone(list(known), CASCADE_GRACE)
    stop_processes(list(known))
    if not asked.is_set():
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


class Watchdog:
    """reefl's end of ``watchdog_main``: ``watch`` a process, ``stop`` them all."""

    def __init__(self, remove_on_death: Path | None) -> None:
        folder = [str(remove_on_death)] if remove_on_death else []
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "reefl.launch.watchdog", *folder],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != "ready\n":
            raise LaunchError("the process watchdog (python -m reefl.launch.watchdog) did not "
                              "start")

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


if __name__ == "__main__":
    watchdog_main(sys.argv[1:])
