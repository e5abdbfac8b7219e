"""The ``reefl`` command. Thin: parsing and exit codes; the work is in reefl.launcher."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

RUN_CONFIG_HELP = (
    "override [tool.flwr.app.config] values: 'k=v k2=v2' (repeatable) or one TOML file, "
    "exactly as `flwr run --run-config`"
)
FEDERATION_CONFIG_HELP = (
    "override simulation settings, e.g. 'num-supernodes=10 client-resources-num-cpus=2' "
    "(defaults: num-supernodes = num-clients; the CPUs shared among the ClientApps of a "
    "round, at least one each)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reefl", description="Federated early-exit transformers on Flower."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run one federated training in a local Flower simulation",
        description="Run the Flower app once (a thin wrapper over `flwr run <app-dir>`).",
    )
    run.add_argument(
        "--app", type=Path, default=None, metavar="DIR",
        help="Flower app directory (default: nearest pyproject.toml with [tool.flwr.app])",
    )  # fmt: skip
    run.add_argument(
        "--run-config", "-c", action="append", default=[], metavar="CONFIG",
        help=RUN_CONFIG_HELP,
    )  # fmt: skip
    run.add_argument(
        "--federation-config", action="append", default=[], metavar="CONFIG",
        help=FEDERATION_CONFIG_HELP,
    )  # fmt: skip
    run.add_argument("--quiet", "-q", action="store_true", help="do not stream the logs")
    return parser


def _error(message: str, code: int) -> int:
    print(f"reefl: error: {message}", file=sys.stderr, flush=True)
    return code


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, through run_app's cleanup (main thread only)."""
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


def cmd_run(args: argparse.Namespace) -> int:
    from reefl.launcher import LaunchError, run_app

    try:
        run_app(
            args.run_config,
            app_dir=args.app,
            federation_overrides=args.federation_config,
            quiet=args.quiet,
        )
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _error("interrupted; all Flower processes stopped", 130)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_as_exit():
        if args.command == "run":
            return cmd_run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
