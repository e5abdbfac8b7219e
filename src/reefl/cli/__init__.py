"""The ``reefl`` command: argparse and exit codes only, one module per group of
sub-commands (``training``: run, deploy, compare, pretrain; ``inspection``: data, costs,
report; ``anytime``: predict, calibrate, export), each a thin layer over a library function
that tests call directly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reefl.anytime.commands import COMMANDS as ANYTIME_COMMANDS
from reefl.anytime.commands import add_commands as add_anytime_commands
from reefl.cli import inspection, training
from reefl.cli.common import error, sigterm_as_exit


def build_parser() -> argparse.ArgumentParser:
    """The ``reefl`` parser: every sub-command, each with its ``handler``."""
    parser = argparse.ArgumentParser(
        prog="reefl", description="Federated early-exit transformers on Flower."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.add_commands(commands)
    inspection.add_commands(commands)
    add_anytime_commands(commands)
    for name, handler in ANYTIME_COMMANDS.items():
        commands.choices[name].set_defaults(handler=handler)
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
