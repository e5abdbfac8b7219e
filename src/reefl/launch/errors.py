"""What ends a launch, as one line: the CLI prints the message and returns ``exit_code``."""

from __future__ import annotations

from pathlib import Path

from reefl.outputs.run_folder import CHECKPOINT_FILE


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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, raised once every Flower process is stopped; ``hint`` says how
    the run can go on."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir

    def hint(self) -> str:
        return resume_hint(self.run_dir)


def resume_hint(run_dir: Path) -> str:
    """How a stopped run goes on: the resume command, or why there is none."""
    if (run_dir / CHECKPOINT_FILE).is_file():
        return f"continue it with `reefl run --resume {run_dir}`"
    return f"no round was saved in {run_dir}, so it cannot be resumed"


def one_line(message: object) -> str:
    """``message`` with its whitespace (line breaks included) collapsed to single spaces."""
    return " ".join(str(message).split())
