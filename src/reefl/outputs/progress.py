"""What a person sees while Flower runs: one progress line, and Flower's log in a file.

``reefl run`` (and ``reefl compare``) send everything ``flwr run --stream`` prints through a
``FlowerLog``: every line goes to ``flower.log`` in the run folder (colours removed), and to
a view that decides what reaches the terminal:

* ``ProgressView`` (the default): one line, updated per round from the run folder's
  ``metrics.jsonl`` (what the ServerApp records after every round, read twice a second):
  round k/R, elapsed time, ETA, the last train loss and the last mean accuracy; live (rich,
  on stderr) where stderr is a terminal, else a plain line per round (tests, CI, a pipe:
  logs stay readable). Flower's warnings and errors are printed as they come, less those of
  NOT_FOR_REEFL.
* ``StreamView`` (``--verbose``): the log as Flower prints it, less NOT_FOR_REEFL; without
  colour codes unless the output is a terminal.
* ``LogView`` (``--quiet``): nothing.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LEVEL = re.compile(r"^(?:\([^)]*\)\s*)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:")
"""A log record's level, after the prefix Ray puts on its actors' lines (``(ClientAppActor
pid=123) WARNING : ...``)."""
ERROR = re.compile(r"^(?:\([^)]*\)\s*)?(ERROR|CRITICAL)\s*:|Traceback \(most recent call last\)")

# The ServerApp's lines (reefl.federation.server_app: _progress_line and the resume line).
POLL_INTERVAL = 0.5  # seconds between two looks at metrics.jsonl
METRICS_FILE = "metrics.jsonl"  # beside flower.log in the run folder


@dataclass(frozen=True)
class Unwanted:
    """A line that Flower or Ray prints in every reefl run, though it does not apply to one:
    ``pattern`` finds it (in the line without colours), ``why`` says why it is wrong here,
    ``then`` finds the line that belongs to it and goes with it (a Python warning's source
    line)."""

    pattern: re.Pattern[str]
    why: str
    then: re.Pattern[str] | None = None


NOT_FOR_REEFL = (
    Unwanted(re.compile(r"Since flwr 1\.32, default simulated SuperNodes changed from 10 to 2"),
             "flwr-simulation logs it in every simulation (flwr/simulation/app.py), but reefl "
             "always sets num-supernodes (to num-clients): no default applies"),
    Unwanted(re.compile(r"To change federation size, use the following command:"),
             "reefl's federation size is num-clients (or --federation-config); the command "
             "that follows would change a federation of the private SuperLink, which is "
             "gone after the run"),
    Unwanted(re.compile(r"flwr federation simulation-config \S+ <superlink> --num-supernodes"),
             "the command of the line above"),
    Unwanted(re.compile(r"FutureWarning: Tip: In future versions of Ray, Ray will no longer "
                        r"override accelerator visible devices"),
             "Ray warns every driver that its handling of num_gpus=0 will change; reefl asks "
             "for GPUs explicitly where there are any (default_federation), so the change "
             "does not concern a run",
             then=re.compile(r"^\s+warnings\.warn\($")),
    Unwanted(re.compile(r"WARNING\s*:\s*Manually terminating ClientAppActor"),
             "Flower's normal shutdown of its Ray actors at the end of every simulation "
             "(flwr/simulation/ray_transport/ray_actor.py), logged as a warning"),
)


def is_warning(text: str) -> bool:
    """Whether ``text`` (without colours) is a log record of level WARNING or above."""
    level = LEVEL.match(text)
    return level is not None and level.group(1) not in ("DEBUG", "INFO")


def plain(line: str) -> str:
    """``line`` without colour codes and line break."""
    return ANSI.sub("", line).rstrip("\r\n")


class LineFilter:
    """Says which lines of Flower's output to show: all but those of NOT_FOR_REEFL (and the
    lines that go with them); an error is always shown."""

    def __init__(self) -> None:
        self._then: re.Pattern[str] | None = None

    def keeps(self, text: str) -> bool:
        """Whether to show ``text`` (one line, without colours); lines are given in order."""
        then, self._then = self._then, None
        if ERROR.search(text):
            return True
        if then is not None and then.search(text):
            return False
        for unwanted in NOT_FOR_REEFL:
            if unwanted.pattern.search(text):
                self._then = unwanted.then
                return False
        return True


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class RunProgress:
    """What the progress line shows, taken from the run's metrics.jsonl records: the round,
    the time since ``started`` (``time.monotonic()`` when the launch began), the ETA (the mean
    duration of the rounds recorded times the rounds left), the last train loss and mean
    accuracy recorded; ``status`` (e.g. "stopping") replaces the ETA once set."""

    rounds: int | None
    started: float
    round: int = 0
    round_seconds: list[float] = field(default_factory=list)
    last_round_at: float | None = None
    train_loss: float | None = None
    mean_accuracy: float | None = None
    diverged: bool = False
    status: str | None = None
    ended: bool = False

    def update(self, records: list[dict], now: float) -> bool:
        """Take every record of metrics.jsonl so far; True if a new round ended."""
        if not records or records[-1].get("round", 0) == self.round:
            return False
        self.round = int(records[-1]["round"])
        self.last_round_at = now
        self.round_seconds = [float(r["round_seconds"]) for r in records
                              if isinstance(r.get("round_seconds"), (int, float))]
        losses = [r["train-loss"] for r in records if "train-loss" in r]
        accuracies = [r["mean_accuracy"] for r in records if "mean_accuracy" in r]
        self.train_loss = losses[-1] if losses else None
        self.mean_accuracy = accuracies[-1] if accuracies else None
        self.diverged = any("diverged" in r for r in records)
        return True

    def eta(self, now: float) -> float | None:
        """Seconds until the last round ends, if a round has ended and rounds are left."""
        if not self.round_seconds or self.rounds is None or self.last_round_at is None:
            return None
        left = self.rounds - self.round
        if left <= 0:
            return None
        per_round = sum(self.round_seconds) / len(self.round_seconds)
        return max(0.0, per_round * left - (now - self.last_round_at))

    def state(self, now: float) -> str | None:
        """The status, the ETA, or what the run does while there is none; None once it has
        ended."""
        if self.ended:
            return None
        if self.status is not None:
            return self.status
        eta = self.eta(now)
        if eta is not None:
            return f"ETA {clock(eta)}"
        if self.last_round_at is None:
            return "starting Flower"
        if self.rounds is not None and self.round >= self.rounds:
            return "finishing"
        return None

    def parts(self, now: float) -> list[str]:
        """The pieces of the line: round, elapsed, state and the last values."""
        parts = [f"round {self.round}/{self.rounds}" if self.rounds else f"round {self.round}",
                 f"{clock(now - self.started)} elapsed"]
        state = self.state(now)
        if state is not None:
            parts.append(state)
        if self.train_loss is not None:
            parts.append(f"train-loss {self.train_loss:.3f}")
        if self.mean_accuracy is not None:
            parts.append(f"mean acc {self.mean_accuracy:.1f}%")
        if self.diverged:
            parts.append("DIVERGED")
        return parts

    def describe(self, now: float) -> str:
        """``round 12/40 · 1:02 elapsed · ETA 3:25 · train-loss 0.412 · mean acc 81.3%``."""
        return " · ".join(self.parts(now))


def read_records(path: Path) -> list[dict]:
    """The whole lines of a metrics.jsonl being written (a line still being written, or an
    unreadable one, is left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class LogView:
    """What the user sees of Flower's output during a run; this one shows nothing
    (``--quiet``). ``shows_log``: whether every line reaches the user (a failure then need
    not repeat the log's last lines)."""

    shows_log = False

    def start(self, rounds: int | None, metrics: Path | None = None) -> None:
        """The run begins; ``rounds`` is its num-server-rounds where known, ``metrics`` the
        metrics.jsonl its rounds are recorded in."""

    def line(self, raw: str) -> None:
        """One line of Flower's output, as Flower printed it (colours, line break)."""

    def note(self, message: str) -> None:
        """One line of reefl's own about the run (e.g. that it is being stopped)."""

    def stopping(self) -> None:
        """The run is being stopped (Ctrl-C, an error): no more ETA."""

    def stop(self) -> None:
        """The run has ended, failed or been interrupted."""


class StreamView(LogView):
    """``--verbose``: Flower's output on stdout as it comes, less NOT_FOR_REEFL."""

    shows_log = True

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._filter = LineFilter()

    def line(self, raw: str) -> None:
        if self._filter.keeps(plain(raw)):
            out = self._out or sys.stdout
            isatty = getattr(out, "isatty", None)
            out.write(raw if isatty and isatty() else plain(raw) + "\n")
            out.flush()

    def note(self, message: str) -> None:
        print(f"reefl: {message}", file=sys.stderr, flush=True)


def wants_live(console: Console) -> bool:
    """Whether the progress line can be redrawn in place: ``console`` writes to a terminal
    (its file is a tty: FORCE_COLOR, which rich also counts, asks for colours, not for
    cursor movement) that understands cursor movement (not TERM=dumb, not TTY_COMPATIBLE=0).
    Otherwise (a pipe, a file, CI) a plain line per round is printed instead."""
    isatty = getattr(console.file, "isatty", None)
    return bool(isatty and isatty()) and console.is_terminal and not console.is_dumb_terminal


class ProgressView(LogView):
    """The default: one progress line on stderr (``RunProgress``) after ``prefix``, fed from
    metrics.jsonl by a polling thread; live where ``wants_live`` (or ``live``) says so, else a
    plain line per round. Flower's warnings and errors that LineFilter keeps are printed as
    they come (above the live line)."""

    BAR_WIDTH = 20  # at most; narrower (or none) where the terminal is narrow

    def __init__(self, prefix: str = "reefl: ", live: bool | None = None,
                 transient: bool = False, console: Console | None = None) -> None:
        from rich.console import Console

        self.prefix = prefix
        self.console = console or Console(stderr=True)
        self.live = wants_live(self.console) if live is None else live
        self.transient = transient  # the live line vanishes at the end (reefl compare)
        self.progress = RunProgress(None, time.monotonic())
        self._filter = LineFilter()
        self._live: Live | None = None
        self._metrics: Path | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self, rounds: int | None, metrics: Path | None = None) -> None:
        from rich.live import Live

        self.progress = RunProgress(rounds, time.monotonic())
        self._metrics = metrics
        self.poll()  # a resumed run starts at its last recorded round
        if self.live:
            self._live = Live(console=self.console, get_renderable=self.renderable,
                              refresh_per_second=2, transient=self.transient)
            self._live.start()
        if metrics is not None:
            self._halt.clear()
            self._poller = threading.Thread(target=self._poll_loop, name="reefl-progress",
                                            daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._halt.wait(POLL_INTERVAL):
            self.poll()

    def poll(self) -> None:
        """Read metrics.jsonl; a plain line for a new round where the line is not live."""
        if self._metrics is None:
            return
        records = read_records(self._metrics)
        now = time.monotonic()
        with self._lock:
            if self.progress.update(records, now) and not self.live:
                self._print(self.prefix + self.progress.describe(now))

    def line(self, raw: str) -> None:
        text = plain(raw)
        if is_warning(text) and self._filter.keeps(text):
            self._print(text)

    def note(self, message: str) -> None:
        self._print(f"reefl: {message}")

    def stopping(self) -> None:
        self.progress.status = "stopping"

    def stop(self) -> None:
        self._halt.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        self.poll()  # the last round, if it came after the last look
        self.progress.ended = True
        if self._live is not None:
            self._live.stop()
            self._live = None

    def renderable(self) -> RenderableType:
        """The live line: the round, a bar (as wide as the terminal leaves room for), then
        the rest of ``RunProgress.parts``, cut with an ellipsis where it does not fit."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        first, *rest = self.progress.parts(time.monotonic())
        head, tail = self.prefix + first, " · ".join(rest)
        room = self.console.width - len(head) - len(tail) - 2
        bar_width = min(self.BAR_WIDTH, room) if room >= 6 else 0
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, min_width=len(head))
        if bar_width:
            grid.add_column(no_wrap=True, width=bar_width)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        rounds = self.progress.rounds
        bar = ProgressBar(total=rounds, completed=self.progress.round, width=bar_width,
                          pulse=not rounds)
        grid.add_row(head, *([bar] if bar_width else []), tail)
        return grid

    def _print(self, text: str) -> None:
        """One line on stderr: above the live line, or plain."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)


class FlowerLog:
    """Where ``flwr run``'s output goes: every line into ``path`` (Flower's log without
    colours, flushed line by line so that ``tail -f`` follows it; appended to when
    ``append``, as for a resumed run), the last lines kept for an error message, and each line
    to ``view``. A context manager: the view is started and stopped with it."""

    TAIL_LINES = 40

    def __init__(self, path: Path, view: LogView, rounds: int | None = None,
                 append: bool = False) -> None:
        self.path = path
        self.view = view
        self.rounds = rounds
        self.append = append
        self._tail: collections.deque[str] = collections.deque(maxlen=self.TAIL_LINES)
        self._file: TextIO | None = None

    def __enter__(self) -> FlowerLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if self.append else "w", encoding="utf-8")
        self.view.start(self.rounds, self.path.parent / METRICS_FILE)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.view.stop()
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, raw: str) -> None:
        """One line of Flower's output, as printed."""
        text = plain(raw)
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()
        self._tail.append(text)
        self.view.line(raw)

    def flush(self) -> None:
        """Every line is flushed as it is written (``write``)."""

    def tail(self) -> str:
        """The last lines written (at most TAIL_LINES), without colours."""
        return "\n".join(self._tail)
