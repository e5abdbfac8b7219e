"""What every sub-command's parser and handler share: the run-config options, the one-line
error with its exit code, and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

RUN_CONFIG_HELP = (
    "override [tool.flwr.app.config] values: 'k=v k2=v2' as `flwr run --run-config` takes "
    "them, or a TOML file; repeatable and mixable, later wins"
)
FEDERATION_CONFIG_HELP = (
    "override simulation settings, e.g. 'num-supernodes=10 client-resources-num-cpus=2' "
    "(defaults: num-supernodes = num-clients; the CPUs shared among the ClientApps of a "
    "round, at least one each)"
)


def add_run_config_options(parser: argparse.ArgumentParser, help: str = RUN_CONFIG_HELP
                           ) -> None:
    """--run-config/-c, --preset/-p and --app: the run config as ``reefl run`` resolves it."""
    parser.add_argument("--run-config", "-c", action="append", default=[], metavar="CONFIG",
                        help=help)
    parser.add_argument("--preset", "-p", default=None, metavar="NAME",
                        help="start from a preset config of the paper's experiments "
                             "(src/reefl/presets/NAME.toml, e.g. cifar100-frozen-k4); "
                             "--run-config values apply on top")
    parser.add_argument(
        "--app", type=Path, default=None, metavar="DIR",
        help="Flower app directory (default: nearest pyproject.toml with [tool.flwr.app])",
    )  # fmt: skip


def add_output_options(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--verbose/-v (and --quiet/-q): what the terminal shows while Flower runs."""
    group = parser.add_mutually_exclusive_group()
    if quiet:
        group.add_argument("--quiet", "-q", action="store_true",
                           help="print only errors and the final table: no progress line "
                                "(Flower's log still goes to <run folder>/flower.log)")
    group.add_argument("--verbose", "-v", action="store_true",
                       help="stream Flower's log (it always goes to <run folder>/flower.log) "
                            "instead of showing a progress line; lines known not to apply "
                            "to a reefl run are left out")


def error(message: str, code: int) -> int:
    """Print ``reefl: error: <message>`` on stderr; return ``code`` (the exit code)."""
    print(f"reefl: error: {message}", file=sys.stderr, flush=True)
    return code


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, through the launch's cleanup (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: options before, between or after the positional arguments
    (``parse_known_intermixed_args``), and every usage error (an unknown argument, or what
    ``check`` finds wrong in the parsed arguments) shown with the sub-command's usage
    rather than the top-level one."""

    def __init__(self, *args: object, check: Callable[[argparse.Namespace], str | None]
                 | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.check = check
        self._inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._inner:  # parse_known_intermixed_args parses in two passes through here
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        problem = self.check(namespace) if self.check is not None else None
        if problem:
            self.error(problem)
        return namespace, []
