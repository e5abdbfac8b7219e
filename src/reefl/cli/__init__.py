"""The ``reefl`` command: argparse and exit codes only, one module per group of
sub-commands (``training``: run, deploy, compare, pretrain; ``inspection``: data, costs,
report; ``anytime``: predict, calibrate, export), each a thin layer over a library function
that tests call directly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reefl.cli import anytime, inspection, training
from reefl.cli.common import CommandParser, error, sigterm_as_exit


def build_parser() -> argparse.ArgumentParser:
    """The ``reefl`` parser: every sub-command, each with its ``handler``."""
    parser = argparse.ArgumentParser(
        prog="reefl", description="Federated early-exit transformers on Flower."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=CommandParser)
    training.add_commands(commands)
    inspection.add_commands(commands)
    anytime.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, put a --preset in front of the --run-config values, run the handler;
    its exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None) is not None:
        from reefl.launch.errors import LaunchError
        from reefl.launch.run_config import with_preset

        try:
            args.run_config = with_preset(args.preset, args.run_config)
        except LaunchError as err:
            return error(str(err), err.exit_code)
    with sigterm_as_exit():
        return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
