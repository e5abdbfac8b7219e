"""``reefl data``, ``costs`` and ``report``: look at a config's data and costs, or at a
finished run, without training. Parsing and exit codes over ``data.summary``,
``outputs.accounting.print_costs`` and ``outputs.html.write_report``."""

from __future__ import annotations

import argparse
from pathlib import Path

from reefl.cli.common import add_run_config_options, error


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The sub-commands of this module, each with its handler as ``handler``."""
    _add_costs(commands)
    _add_data(commands)
    _add_report(commands)


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(
        "data",
        help="show how the run config partitions its data (nothing is trained)",
        description=(
            "Load the data set of the run config (the app's defaults plus --preset and "
            "--run-config, as for `reefl run`; decoded into the cache on first use), "
            "partition it, print the clients, examples per client (min/median/max), "
            "classes, the local and global test sets, and save a per-client label "
            "histogram as a PNG."
        ),
    )
    add_run_config_options(data)
    data.add_argument("--output", "-o", type=Path, default=None, metavar="PNG",
                      help="where the histogram goes (default: <output-dir>/data-<dataset>"
                           "-s<seed>-<options digest>.png, one file per partition)")
    data.add_argument("--json", action="store_true", help="print the summary as JSON")
    data.set_defaults(handler=cmd_data)


def _add_costs(commands: argparse._SubParsersAction) -> None:
    costs = commands.add_parser(
        "costs",
        help="print what every fine-tuning regime costs per tier (nothing is trained)",
        description=(
            "For the run config (the app's defaults plus --run-config), print one row per "
            "fine-tuning regime and one column per tier: the parameters a client trains and "
            "sends each way per round, the MB that is (fp32), and its share of the full "
            "model; before it, the config's own per-tier table with the forward FLOPs of "
            "reaching each exit. The models are built on the meta device: no data, no "
            "weights, no download. The classes and input channels come from the data set "
            "unless given."
        ),
    )
    add_run_config_options(costs)
    costs.add_argument("--num-classes", type=int, default=None, metavar="C",
                       help="classes of the task (default: the data set's)")
    costs.add_argument("--in-chans", type=int, default=None, metavar="N",
                       help="input channels (default: the data set's)")
    costs.set_defaults(handler=cmd_costs)


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="write one static HTML page (and PNGs) of a run or comparison folder",
        description=(
            "Write DIR/report/index.html and its PNGs: for a run folder, test accuracy per exit "
            "over the rounds, the final per-exit table, the per-tier cost table and the run "
            "config, plus the calibrated accuracy-vs-FLOPs curve (calibration.json) and the "
            "personalised accuracies (personalised.json) when present; for a comparison folder "
            "(reefl compare's DIR), the comparison table, accuracy per exit, every entry's "
            "per-round curves (mean over seeds), its costs and accuracy_vs_flops.png when "
            "present. The page holds its images (data: URIs): it works copied alone, offline. "
            "Prints the page's path."
        ),
    )
    report.add_argument("folder", type=Path, metavar="DIR",
                        help="a run folder (metrics.jsonl or final.json) or a comparison folder "
                             "(comparison.json)")
    report.set_defaults(handler=cmd_report)


def cmd_costs(args: argparse.Namespace) -> int:
    from reefl.data import DataError
    from reefl.federation.inputs import source_task
    from reefl.launch.errors import LaunchError
    from reefl.launch.run_config import resolved_config
    from reefl.methods import TaskSpec
    from reefl.outputs.accounting import print_costs

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
        if args.num_classes is None or args.in_chans is None:
            task = source_task(cfg)
            task = TaskSpec(num_classes=args.num_classes or task.num_classes,
                            in_chans=args.in_chans or task.in_chans)
        else:
            task = TaskSpec(num_classes=args.num_classes, in_chans=args.in_chans)
    except LaunchError as err:
        return error(str(err), err.exit_code)
    except DataError as err:
        return error(f"dataset: {err}; or give --num-classes and --in-chans", 2)
    print_costs(cfg, task)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from reefl.data import DataError
    from reefl.data.summary import write_summary
    from reefl.launch.errors import LaunchError
    from reefl.launch.run_config import resolved_config

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
        text, path = write_summary(cfg.data_options, Path(cfg.output_dir), args.output,
                                   as_json=args.json)
    except LaunchError as err:
        return error(str(err), err.exit_code)
    except DataError as err:
        return error(f"dataset: {err}", 2)
    print(text)
    print(f"label histogram: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reefl.outputs.html import ReportError, write_report

    try:
        page = write_report(args.folder)
    except ReportError as err:
        return error(f"report: {err}", 2)
    print(page)
    return 0
