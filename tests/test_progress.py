"""What a person sees of a run: the progress line, the filter of Flower's log, flower.log,
the failure report, the Ray session's place; and one real run (slow) that shows it all."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from reefl import cli
from reefl.federation.server_app import _progress_line
from reefl.launch import processes, simulation
from reefl.launch.run_config import PreparedRun
from reefl.outputs import run_folder
from reefl.outputs.progress import (
    NOT_FOR_REEFL,
    FlowerLog,
    LineFilter,
    LogView,
    ProgressView,
    RunProgress,
    StreamView,
    clock,
    plain,
    read_records,
    wants_live,
)
from reefl.outputs.run_folder import FLOWER_LOG, RunFolder, holds_run_files


def flower(line: str, level: str = "INFO") -> str:
    """``line`` as ``flwr run --stream`` prints a log record of ``level`` (colours)."""
    colour = {"INFO": "92", "WARNING": "93", "ERROR": "91"}[level]
    return f"\x1b[{colour}m{level} \x1b[0m:      {line}\n"


def round_line(number: int, rounds: int, seconds: float, loss: float | None = None,
               mean: float | None = None) -> str:
    """The ServerApp's log line of a round, made by its own formatter."""
    record: dict[str, object] = {"round": number, "lr": 0.001, "round_seconds": seconds}
    if loss is not None:
        record["train-loss"] = loss
    if mean is not None:
        record.update(exit_accuracy=[mean - 1, mean + 1], mean_accuracy=mean,
                      ensemble_accuracy=mean + 2)
    return flower("reefl: " + _progress_line(record, rounds))


# Lines of a real `reefl run` (Flower 1.41, Ray 2.55) that do not apply to it.
UNWANTED_LINES = [
    flower("Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.", "WARNING"),
    flower("To change federation size, use the following command:"),
    flower("\tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>"),
    "/venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In "
    "future versions of Ray, Ray will no longer override accelerator visible devices env var "
    "if num_gpus=0 or num_gpus=None (default). To enable this behavior and turn off this error "
    "message, set RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0\n",
    "  warnings.warn(\n",
    "\x1b[36m(ClientAppActor pid=19936)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating "
    "ClientAppActor\n",
]


# -- the progress line --------------------------------------------------------------------------


def _record(k: int, seconds: float, loss: float | None = None,
            mean: float | None = None) -> dict[str, Any]:
    """A metrics.jsonl record of round ``k`` as the ServerApp writes it."""
    record: dict[str, Any] = {"round": k, "lr": 0.05, "round_seconds": seconds}
    if loss is not None:
        record["train-loss"] = loss
    if mean is not None:
        record.update(exit_accuracy=[mean - 1, mean + 1], mean_accuracy=mean)
    return record


def test_the_progress_line_follows_the_metrics_records() -> None:
    progress = RunProgress(rounds=40, started=100.0)
    records: list[dict[str, Any]] = []
    assert progress.describe(112.0) == "round 0/40 · 0:12 elapsed · starting Flower"
    assert not progress.update(records, now=120.0)
    records.append(_record(1, 10.0, loss=2.5))
    assert progress.update(records, now=130.0)
    assert progress.describe(130.0) == (
        "round 1/40 · 0:30 elapsed · ETA 6:30 · train-loss 2.500")
    assert not progress.update(records, now=131.0)  # nothing new
    records.append(_record(2, 20.0, loss=0.4123, mean=81.25))
    assert progress.update(records, now=150.0)
    # mean round 15 s x 38 rounds left, counted down since the last round
    assert progress.describe(160.0) == (
        "round 2/40 · 1:00 elapsed · ETA 9:20 · train-loss 0.412 · mean acc 81.2%")
    records.append(_record(3, 15.0))  # no loss, no evaluation
    progress.update(records, now=165.0)
    assert progress.describe(165.0).endswith("train-loss 0.412 · mean acc 81.2%")
    records += [_record(k, 15.0) for k in range(4, 40)] + [_record(40, 15.0, 0.1, 90.0)]
    progress.update(records, now=700.0)
    assert progress.describe(700.0) == (
        "round 40/40 · 10:00 elapsed · finishing · train-loss 0.100 · mean acc 90.0%")
    progress.status = "stopping"
    assert progress.describe(701.0).startswith("round 40/40 · 10:01 elapsed · stopping ·")
    progress.ended = True
    assert "stopping" not in progress.describe(710.0)


def test_a_resumed_run_starts_at_its_last_recorded_round(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(_record(k, 5.0)) + "\n" for k in (1, 2))
                       + '{"round": 3, "lr"')  # a line still being written
    assert [r["round"] for r in read_records(metrics)] == [1, 2]
    view = ProgressView(live=False)
    view.start(40, metrics)
    try:
        assert view.progress.describe(view.progress.started + 5) == (
            "round 2/40 · 0:05 elapsed · ETA 3:05")  # 5 s x 38 left, 5 s ago
    finally:
        view.stop()


def test_the_live_line_keeps_the_round_at_80_columns() -> None:
    from rich.console import Console

    console = Console(width=80, file=io.StringIO(), force_terminal=True)
    view = ProgressView(live=False, console=console)
    view.progress = RunProgress(6, time.monotonic() - 90)
    view.progress.update([_record(1, 40.0, 2.345, 55.5)], time.monotonic())
    console.print(view.renderable())
    line = plain(console.file.getvalue()).splitlines()[0]
    assert line.startswith("reefl: round 1/6 ") and len(line) <= 80
    assert "1:30 elapsed" in line


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.9, 61, 3600, 3725, -3)] == [
        "0:00", "0:59", "1:01", "1:00:00", "1:02:05", "0:00"]


def test_a_plain_line_per_round_where_stderr_is_no_terminal(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    view = ProgressView()
    assert not view.live  # pytest's captured stderr is no terminal
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    view.start(2, metrics)
    for line in [flower("Starting Flower Simulation"), *UNWANTED_LINES,
                 flower("reefl: roll call: 3 of 4 partitions have a SuperNode", "WARNING")]:
        view.line(line)
    with metrics.open("a") as file:
        file.write(json.dumps(_record(1, 1.0, loss=1.5)) + "\n")
    view.poll()
    view.line(flower("Traceback: boom", "ERROR"))
    with metrics.open("a") as file:
        file.write(json.dumps(_record(2, 1.0, loss=1.25, mean=50.0)) + "\n")
    view.stop()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert lines[0] == "WARNING :      reefl: roll call: 3 of 4 partitions have a SuperNode"
    assert lines[1].startswith("reefl: round 1/2 · 0:00 elapsed · ETA 0:0")
    assert lines[1].endswith(" · train-loss 1.500")
    assert lines[2] == "ERROR :      Traceback: boom"
    assert lines[3].startswith("reefl: round 2/2 · ") and lines[3].endswith(
        "finishing · train-loss 1.250 · mean acc 50.0%")
    assert len(lines) == 4


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_line_is_drawn_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    out = Terminal()
    console = Console(file=out, width=120)
    view = ProgressView(console=console)
    assert view.live
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(_record(1, 1.0, loss=0.5, mean=42.0)) + "\n")
    view.start(4, metrics)
    view.line(flower("client 3 not used: diverged", "WARNING"))
    view.stop()
    text = plain(out.getvalue())
    assert "reefl: round 1/4" in text and "━" in text and "mean acc 42.0%" in text
    assert "WARNING :      client 3 not used: diverged" in text


def test_no_live_line_on_a_dumb_terminal_or_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_live(Console(file=Terminal()))
    monkeypatch.setenv("FORCE_COLOR", "1")  # colours asked for: still a pipe
    assert not wants_live(Console(file=io.StringIO()))
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not wants_live(Console(file=Terminal()))


# -- what --verbose shows -----------------------------------------------------------------------


def test_lines_that_do_not_apply_to_reefl_are_left_out() -> None:
    assert all(unwanted.why for unwanted in NOT_FOR_REEFL)
    keep = LineFilter()
    assert not any(keep.keeps(plain(line)) for line in UNWANTED_LINES)
    kept = [flower("Starting Flower Simulation"), "  warnings.warn(\n",  # not after a warning
            flower("Federation `@none/default` (20 simulated SuperNodes)"),
            flower("reefl: round 1/2 | lr 0.001 | 1.0s"),
            flower("ClientApp raised: Since flwr 1.32, default simulated SuperNodes changed "
                   "from 10 to 2.", "ERROR")]  # an error is never left out
    assert all(keep.keeps(plain(line)) for line in kept)


def test_the_stream_keeps_flowers_colours_on_a_terminal_less_the_unwanted_lines() -> None:
    lines = [flower("Starting Flower Simulation"), *UNWANTED_LINES, round_line(1, 2, 1.0)]
    for out, shown in ((Terminal(), lines[0] + lines[-1]),  # colours where they show
                       (io.StringIO(), plain(lines[0]) + "\n" + plain(lines[-1]) + "\n")):
        view = StreamView(out)
        for line in lines:
            view.line(line)
        assert out.getvalue() == shown


# -- flower.log and a failed run ----------------------------------------------------------------


class Recording(LogView):
    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self, rounds: int | None, metrics: Path | None = None) -> None:
        self.events.append(f"start {rounds}")

    def line(self, raw: str) -> None:
        self.events.append(raw)

    def stop(self) -> None:
        self.events.append("stop")


def test_flower_log_gets_every_line_without_colours(tmp_path: Path) -> None:
    path = tmp_path / "run" / FLOWER_LOG
    view = Recording()
    with FlowerLog(path, view, rounds=2) as log:
        log.write(UNWANTED_LINES[0])
        log.write(round_line(1, 2, 1.0))
        assert path.read_text().splitlines()[1] == plain(round_line(1, 2, 1.0))  # flushed
    assert view.events == ["start 2", UNWANTED_LINES[0], round_line(1, 2, 1.0), "stop"]
    with pytest.raises(KeyboardInterrupt), FlowerLog(path, view, append=True) as log:
        log.write(flower("resumed"))
        raise KeyboardInterrupt
    assert view.events[-1] == "stop"
    assert path.read_text() == "".join(plain(line) + "\n" for line in [
        UNWANTED_LINES[0], round_line(1, 2, 1.0), flower("resumed")])
    with FlowerLog(path, LogView()) as log:  # a new run starts a new log
        log.write(flower("new"))
    assert path.read_text() == "INFO :      new\n" and log.tail() == "INFO :      new"


def test_a_folder_holding_only_flower_log_holds_no_run(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / FLOWER_LOG).write_text("a failed start\n")
    assert not holds_run_files(folder) and not run_folder.holds_run_files(folder)
    RunFolder.create(folder)  # the ServerApp starts the run in it
    assert holds_run_files(folder)


def _flower_that_fails(prepared: PreparedRun, federation: object, log: FlowerLog
                       ) -> tuple[int, str]:
    for k in range(60):
        log.write(flower(f"line {k}"))
    log.write(flower("ServerApp raised ValueError: boom", "ERROR"))
    return 1, "superlink said bye"


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_run_shows_the_end_of_flowers_log_and_where_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        verbose: bool) -> None:
    monkeypatch.setattr(simulation, "_run_flower", _flower_that_fails)
    code = cli.main(["run", *(["-v"] if verbose else ["-q"]),
                     "-c", f"output-dir='{tmp_path}' run-name='r'"])
    captured = capsys.readouterr()
    log = tmp_path / "r" / FLOWER_LOG
    assert code == 1 and log.read_text().count("\n") == 61
    error = captured.err.splitlines()[-1]
    assert error.startswith("reefl: error: run failed (flwr run exited with 1)")
    assert error.endswith(f"; Flower's log {log}; no round was saved in {log.parent}, so it "
                          "cannot be resumed")
    assert "--- flower-superlink output (last lines) ---\nsuperlink said bye" in captured.err
    if verbose:  # the whole log was on stdout already
        assert "line 0" in captured.out and "line 0" not in captured.err
    else:
        assert captured.out == ""
        assert f"--- Flower's log, last lines (all of it: {log}) ---" in captured.err
        assert "line 20" not in captured.err and "line 21" in captured.err
        assert "ERROR :      ServerApp raised ValueError: boom" in captured.err


def test_verbose_and_quiet_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "-q", "-v"])
    assert "not allowed with argument" in capsys.readouterr().err


# -- the Ray session ----------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"TMPDIR": "/var/tmp/x"}, {"RAY_TMPDIR": "/data/ray-tmp"},
                                 {"TMPDIR": "/a", "RAY_TMPDIR": "/b"}])
def test_ray_temp_root_is_where_ray_goes(monkeypatch: pytest.MonkeyPatch,
                                         env: dict[str, str]) -> None:
    from ray._common.utils import get_default_system_temp_dir

    for key in ("TMPDIR", "RAY_TMPDIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert simulation.ray_temp_root() == Path(get_default_system_temp_dir())


def test_the_ray_session_goes_into_the_private_flower_home(tmp_path: Path) -> None:
    home = Path("/tmp/reefl-flwr-abcdefgh")  # as tempfile names it (nothing is made)
    assert simulation.ray_env(home)["RAY_TMPDIR"] == str(home)
    # where Ray's socket paths would not fit, Ray keeps its own place
    assert simulation.ray_env(Path("/" + "x" * 40)) == simulation.RAY_LOOPBACK


# -- one real run -------------------------------------------------------------------------------


def _is_loopback(ip: str) -> bool:
    """Whether ``ip`` (as psutil shows a listening address) is a loopback address, the IPv4
    one mapped into IPv6 included."""
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listening_sockets(groups: list[processes.ProcessGroup]
                       ) -> tuple[set[tuple[str, str]], threading.Event]:
    """(process name, address) of every socket a process of ``groups`` listens on, sampled
    twice a second in a thread until the returned event is cleared."""
    import psutil

    seen: set[tuple[str, str]] = set()
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            for group in list(groups):
                for tracked in list(group.processes):
                    for process in tracked.alive():
                        with contextlib.suppress(psutil.Error):
                            for c in process.net_connections(kind="inet"):
                                if c.status == psutil.CONN_LISTEN:
                                    seen.add((process.name(), c.laddr.ip))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    return seen, running


def _mode_problems(folder: Path, umask: int) -> list[str]:
    """Every file or folder below ``folder`` whose mode is not what open()/mkdir() give."""
    problems = []
    for path in folder.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != expected:
            problems.append(f"{path.relative_to(folder)}: {mode:o}, not {expected:o}")
    return problems


@pytest.mark.slow
def test_a_real_run_shows_progress_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`reefl run` as a person starts it (not on a terminal: plain progress lines): the
    rounds on stderr, the table on stdout, Flower's log in flower.log only, the Ray session
    made in the private FLWR_HOME and gone with it, run folder and cache files with the
    modes of the umask (027 here: 0640 files, 0750 folders), and every port that any process
    of the run listened on (SuperLink, simulation, Ray's servers, ClientApps) on the
    loopback interface only."""
    from test_end_to_end import TINY_RUN

    # short, as Ray's socket paths go below it (tmp_path is too long: ray_env)
    ray_root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # noqa: S108
    monkeypatch.setenv("RAY_TMPDIR", str(ray_root))
    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path / "cache"))
    sessions: list[Path] = []
    stop = processes.ProcessGroup.stop

    def recording_stop(self: processes.ProcessGroup) -> None:
        assert self.remove_on_death is not None  # the private FLWR_HOME
        sessions.extend((self.remove_on_death / "ray").glob("session_2*"))
        stop(self)

    monkeypatch.setattr(processes.ProcessGroup, "stop", recording_stop)
    groups: list[processes.ProcessGroup] = []
    spawn = processes.ProcessGroup.spawn

    def recording_spawn(self: processes.ProcessGroup, *args: Any, **kwargs: Any) -> Any:
        groups.append(self)
        return spawn(self, *args, **kwargs)

    monkeypatch.setattr(processes.ProcessGroup, "spawn", recording_spawn)
    listening, running = _listening_sockets(groups)
    previous = os.umask(0o027)
    try:
        code = cli.main(["run", "-c", f'{TINY_RUN} output-dir="{tmp_path / "out"}" '
                                      'run-name="r"'])
    finally:
        os.umask(previous)
        running.clear()
        left = list(ray_root.iterdir())
        shutil.rmtree(ray_root)
    captured = capsys.readouterr()
    run_dir = tmp_path / "out" / "r"
    assert code == 0, captured.err
    progress = [line for line in captured.err.splitlines() if line.startswith("reefl: round")]
    assert [line.split(" · ")[0] for line in progress] == ["reefl: round 1/2",
                                                           "reefl: round 2/2"]
    assert "mean acc" in progress[-1]
    assert "ensemble" in captured.out and "INFO" not in captured.out + captured.err
    assert "Since flwr 1.32" not in captured.err
    log = (run_dir / FLOWER_LOG).read_text()
    assert "reefl: round 2/2 | " in log and "\x1b[" not in log
    assert json.loads((run_dir / "final.json").read_text())["rounds"] == 2

    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("ClientAppActor" in n for n in names)
    assert [(name, ip) for name, ip in listening if not _is_loopback(ip)] == []
    assert sessions, "Ray made no session in the private FLWR_HOME"
    assert left == []  # the private FLWR_HOME, and Ray's session in it, are gone
    assert _mode_problems(run_dir, 0o027) == []
    assert _mode_problems(tmp_path / "cache", 0o027) == []
