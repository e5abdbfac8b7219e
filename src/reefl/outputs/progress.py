"""What a person sees while Flower runs: one progress line, and Flower's log in a file.

``reefl run`` (and ``reefl compare``) send everything ``flwr run --stream`` prints through a
``FlowerLog``: every line goes to ``flower.log`` in the run folder (colours removed), and to
a view that decides what reaches the terminal:

* ``ProgressView`` (the default): one line, updated per round from the ServerApp's
  ``reefl: round k/R | ...`` log lines: round k/R, elapsed time, ETA, the last train loss
  and the last mean accuracy; live (rich, on stderr) where stderr is a terminal, else a
  plain line per round (tests, CI, a pipe: logs stay readable). Flower's warnings and
  errors are printed as they come, less those of NOT_FOR_REEFL.
* ``StreamView`` (``--verbose``): the log as Flower prints it, less NOT_FOR_REEFL.
* ``LogView`` (``--quiet``): nothing.
"""

from __future__ import annotations

import collections
import re
import sys
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
ROUND = re.compile(r"reefl: round (\d+)/(\d+) \|")
TRAIN_LOSS = re.compile(r"\| train-loss (\S+) \|")
MEAN_ACCURACY = re.compile(r"\] mean (\S+) ens ")
DIVERGED = re.compile(r"\| diverged \|")
ROUND_SECONDS = re.compile(r"\| ([0-9.]+)s\s*$")
RESUMED = re.compile(r"reefl: resuming after round (\d+) of (\d+)")


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


def _number(pattern: re.Pattern[str], text: str) -> float | None:
    found = pattern.search(text)
    return float(found.group(1)) if found else None


@dataclass
class RunProgress:
    """What the progress line shows, taken from the ServerApp's log lines: the round, the
    time since ``started`` (``time.monotonic()`` when the launch began), the ETA (the mean
    duration of the rounds seen times the rounds left), the last train loss and mean
    accuracy that a round reported."""

    rounds: int | None
    started: float
    round: int = 0
    round_seconds: list[float] = field(default_factory=list)
    last_round_at: float | None = None
    train_loss: float | None = None
    mean_accuracy: float | None = None
    diverged: bool = False
    ended: bool = False

    def update(self, text: str, now: float) -> bool:
        """Take one log line (without colours); True if it ended a round."""
        resumed = RESUMED.search(text)
        if resumed:
            self.round, self.rounds = int(resumed.group(1)), int(resumed.group(2))
            return False
        found = ROUND.search(text)
        if not found:
            return False
        self.round, self.rounds = int(found.group(1)), int(found.group(2))
        self.last_round_at = now
        seconds = _number(ROUND_SECONDS, text)
        if seconds is not None:
            self.round_seconds.append(seconds)
        loss, accuracy = _number(TRAIN_LOSS, text), _number(MEAN_ACCURACY, text)
        self.train_loss = self.train_loss if loss is None else loss
        self.mean_accuracy = self.mean_accuracy if accuracy is None else accuracy
        self.diverged = self.diverged or DIVERGED.search(text) is not None
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
        """The ETA, or what the run does while there is none; None once it has ended."""
        eta = self.eta(now)
        if self.ended:
            return None
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


class LogView:
    """What the user sees of Flower's output during a run; this one shows nothing
    (``--quiet``). ``shows_log``: whether every line reaches the user (a failure then need
    not repeat the log's last lines)."""

    shows_log = False

    def start(self, rounds: int | None) -> None:
        """The run begins; ``rounds`` is its num-server-rounds where known."""

    def line(self, raw: str) -> None:
        """One line of Flower's output, as Flower printed it (colours, line break)."""

    def note(self, message: str) -> None:
        """One line of reefl's own about the run (e.g. that it is being stopped)."""

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
            out.write(raw)
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
    """The default: one progress line on stderr (``RunProgress``) after ``prefix``; live where
    ``wants_live`` (or ``live``) says so, else a plain line per round. Flower's warnings and
    errors that LineFilter keeps are printed as they come (above the live line)."""

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

    def start(self, rounds: int | None) -> None:
        from rich.live import Live

        self.progress = RunProgress(rounds, time.monotonic())
        if self.live:
            self._live = Live(console=self.console, get_renderable=self.renderable,
                              refresh_per_second=2, transient=self.transient)
            self._live.start()

    def line(self, raw: str) -> None:
        text = plain(raw)
        now = time.monotonic()
        if self.progress.update(text, now):
            if not self.live:
                self._print(self.prefix + self.progress.describe(now))
        elif is_warning(text) and self._filter.keeps(text):
            self._print(text)

    def note(self, message: str) -> None:
        self._print(f"reefl: {message}")

    def stop(self) -> None:
        self.progress.ended = True
        if self._live is not None:
            self._live.stop()
            self._live = None

    def renderable(self) -> RenderableType:
        """The live line: the round, a bar, then the rest of ``RunProgress.parts``."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        first, *rest = self.progress.parts(time.monotonic())
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        rounds = self.progress.rounds
        bar = ProgressBar(total=rounds, completed=self.progress.round, width=24,
                          pulse=not rounds)
        grid.add_row(self.prefix + first, bar, " · ".join(rest))
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
        self.view.start(self.rounds)
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

    def tail(self) -> str:
        """The last lines written (at most TAIL_LINES), without colours."""
        return "\n".join(self._tail)
