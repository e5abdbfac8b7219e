"""The ``reefl`` command. Thin: parsing and exit codes; the work is in reefl.launcher."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from reefl.anytime.commands import COMMANDS as ANYTIME_COMMANDS
from reefl.anytime.commands import add_commands as add_anytime_commands

RUN_CONFIG_HELP = (
    "override [tool.flwr.app.config] values: 'k=v k2=v2' as `flwr run --run-config` takes "
    "them, or a TOML file; repeatable and mixable, later wins"
)
FEDERATION_CONFIG_HELP = (
    "override simulation settings, e.g. 'num-supernodes=10 client-resources-num-cpus=2' "
    "(defaults: num-supernodes = num-clients; the CPUs shared among the ClientApps of a "
    "round, at least one each)"
)


def _add_run_config_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--run-config", "-c", action="append", default=[], metavar="CONFIG",
                        help=help)
    parser.add_argument("--preset", "-p", default=None, metavar="NAME",
                        help="start from a preset config of the paper's experiments "
                             "(src/reefl/presets/NAME.toml, e.g. cifar100-frozen-k4); "
                             "--run-config values apply on top")


def _add_verbose_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="stream Flower's log (it always goes to <run folder>/flower.log) "
                             "instead of showing a progress line; lines known not to apply "
                             "to a reefl run are left out")


def _add_app_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app", type=Path, default=None, metavar="DIR",
        help="Flower app directory (default: nearest pyproject.toml with [tool.flwr.app])",
    )  # fmt: skip


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
    _add_app_option(run)
    _add_run_config_option(run, RUN_CONFIG_HELP)
    run.add_argument(
        "--federation-config", action="append", default=[], metavar="CONFIG",
        help=FEDERATION_CONFIG_HELP,
    )  # fmt: skip
    run.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_DIR",
        help="continue the interrupted run in RUN_DIR from its checkpoint.safetensors, with "
             "exactly its config.json (no --run-config or --preset); a finished run's table "
             "is printed",
    )  # fmt: skip
    output = run.add_mutually_exclusive_group()
    output.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing but errors: no progress line, no final table "
                             "(Flower's log still goes to <run folder>/flower.log)")
    _add_verbose_option(output)
    _add_deploy(commands)
    _add_compare(commands)
    _add_costs(commands)
    _add_data(commands)
    _add_pretrain(commands)
    add_anytime_commands(commands)
    _add_report(commands)
    return parser


def _add_deploy(commands: argparse._SubParsersAction) -> None:
    from reefl.deploy import add_deploy_parser

    deploy = add_deploy_parser(commands)
    _add_app_option(deploy)
    _add_run_config_option(deploy, RUN_CONFIG_HELP)


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
    _add_run_config_option(data, RUN_CONFIG_HELP)
    data.add_argument("--output", "-o", type=Path, default=None, metavar="PNG",
                      help="where the histogram goes (default: <output-dir>/data-<dataset>"
                           "-s<seed>.png)")
    data.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_app_option(data)


def _add_pretrain(commands: argparse._SubParsersAction) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="train the backbone centrally on one data set; write a DeiT-format checkpoint",
        description=(
            "Train the run config's backbone (model, embed-dim, depth, num-heads, patch-size, "
            "mlp-ratio, img-size; the app's defaults plus --preset and --run-config, as for "
            "`reefl run`) with a LayerNorm + Linear head on the whole training split of its "
            "dataset, centrally, with the input pipeline of a run with `pretrained` set "
            "(3 channels, ImageNet mean/std for images). AdamW (lr-max, weight-decay), cosine "
            "to lr-min, batch-size, seed, mixed-precision. Prints one line per epoch (train "
            "loss; test accuracy when the data set has a test split), then writes the "
            "checkpoint under timm/DeiT names and a JSON beside it; start a federated run "
            "from it with `reefl run -c 'pretrained=\"PATH\"'`."
        ),
    )
    _add_run_config_option(pretrain, RUN_CONFIG_HELP)
    pretrain.add_argument("--epochs", "-e", type=int, default=3, metavar="N",
                          help="passes over the training split (default: 3)")
    pretrain.add_argument("--output", "-o", type=Path, default=None, metavar="PATH",
                          help="the checkpoint: .safetensors, or .pth/.pt for a torch file "
                               "with a 'model' key (default: <output-dir>/pretrain-<dataset>-"
                               "<model>.safetensors); a JSON of how it was made goes beside it "
                               "(same name, .json); "
                               "an existing file is replaced once training has finished")
    pretrain.add_argument("--max-examples", type=int, default=None, metavar="N",
                          help="train on a seeded random N of the training examples (and "
                               "test on at most N), for a quick run")
    pretrain.add_argument("--threads", type=int, default=None, metavar="N",
                          help="CPU threads of torch (default: torch's, i.e. OMP_NUM_THREADS "
                               "or every core); 1 is fastest for a small model on cores that "
                               "other work shares")
    _add_app_option(pretrain)


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
    _add_run_config_option(costs, RUN_CONFIG_HELP)
    costs.add_argument("--num-classes", type=int, default=None, metavar="C",
                       help="classes of the task (default: the data set's)")
    costs.add_argument("--in-chans", type=int, default=None, metavar="N",
                       help="input channels (default: the data set's)")
    _add_app_option(costs)


def _add_compare(commands: argparse._SubParsersAction) -> None:
    from reefl.compare import ENTRY_SYNTAX_HELP

    compare = commands.add_parser(
        "compare",
        help="run several methods/ablations x seeds and write one comparison table",
        description=(
            "Run every entry of --methods with every seed of --seeds (one `reefl run` each, "
            "seed by seed; all configs are checked first), then print and write "
            "DIR/comparison.md (per-exit accuracy, mean, ensemble, mean ± sample std over "
            "seeds, and the parameters each tier sends per round), DIR/comparison.json and "
            "DIR/comparison.png. Run folders go to DIR/runs/<entry>-s<seed>. For one seed every "
            "entry gets the same data, partition, tiers and client sampling. A failed run is "
            "reported and the others go on; the exit code is then 1."
        ),
    )
    compare.add_argument("--methods", "-m", required=True, action="append", metavar="ENTRIES",
                         help=ENTRY_SYNTAX_HELP + " (repeatable: joined with commas)")
    compare.add_argument("--seeds", "-s", default="0", metavar="SEEDS",
                         help="comma-separated seeds, e.g. 0,1,2 (default: 0)")
    compare.add_argument("--output-dir", "-o", required=True, type=Path, metavar="DIR",
                         help="where the table, JSON, plot and run folders (DIR/runs) go")
    _add_run_config_option(
        compare, RUN_CONFIG_HELP + "; applied to every run, before the entry's own overrides "
        "(method, seed, output-dir and run-name are set by compare)")
    compare.add_argument(
        "--federation-config", action="append", default=[], metavar="CONFIG",
        help=FEDERATION_CONFIG_HELP,
    )  # fmt: skip
    _add_app_option(compare)
    compare.add_argument(
        "--resume", action="store_true",
        help="reuse the run folders that hold a finished run of the same config, and continue "
             "those with a checkpoint of it (without --resume, existing run folders are an "
             "error)",
    )  # fmt: skip
    _add_verbose_option(compare)


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
    from reefl.launcher import LaunchError, RunInterrupted, run_app
    from reefl.progress import StreamView

    try:
        run_app(
            args.run_config,
            app_dir=args.app,
            federation_overrides=args.federation_config,
            quiet=args.quiet,
            resume=args.resume,
            view=StreamView() if args.verbose else None,
        )
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    except KeyboardInterrupt as err:
        hint = f"; {err.hint()}" if isinstance(err, RunInterrupted) else ""
        return _error(f"interrupted; all Flower processes stopped{hint}", 130)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from reefl.compare import main_compare
    from reefl.launcher import LaunchError

    try:
        return main_compare(
            args.methods, args.seeds, args.output_dir, args.run_config,
            args.federation_config, app_dir=args.app, resume=args.resume, verbose=args.verbose,
        )  # fmt: skip
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _error("interrupted; all Flower processes stopped (finished runs are in the "
                      "comparison files; the same command with --resume goes on)", 130)


def cmd_costs(args: argparse.Namespace) -> int:
    from reefl.accounting import regime_costs, regime_table, tier_costs, tier_table
    from reefl.launcher import LaunchError, resolved_config
    from reefl.methods import TaskSpec, build_method
    from reefl.tables import print_table

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    if args.num_classes is None or args.in_chans is None:
        from reefl.data import DataError
        from reefl.federation.inputs import source_task

        try:
            task = source_task(cfg)
        except DataError as err:
            return _error(f"dataset: {err}; or give --num-classes and --in-chans", 2)
        args.num_classes = args.num_classes or task.num_classes
        args.in_chans = args.in_chans or task.in_chans
    method = build_method(cfg, TaskSpec(num_classes=args.num_classes, in_chans=args.in_chans))
    print(f"{cfg.method}, {cfg.model} backbone, exits after blocks {method.exit_blocks}, "
          f"{args.num_classes} classes, regime {cfg.regime}: per tier, per round", flush=True)
    print_table(tier_table(tier_costs(method)))
    print("\nEvery regime: trained parameters · MB sent each way per round · share of the "
          "full model", flush=True)
    print_table(regime_table(regime_costs(method), current=cfg.regime))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import json

    from reefl.data import DataError, build_federated_data
    from reefl.data.summary import (
        dataset_slug,
        format_summary,
        partition_summary,
        plot_label_histogram,
    )
    from reefl.launcher import LaunchError, resolved_config

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
        data = build_federated_data(cfg.data_options)
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    except DataError as err:
        return _error(f"dataset: {err}", 2)
    path = args.output or Path(cfg.output_dir) / f"data-{dataset_slug(cfg.dataset)}-s{cfg.seed}.png"
    summary = partition_summary(data)
    plot_label_histogram(data, path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    print(f"label histogram: {path}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from reefl.data import DataError
    from reefl.launcher import LaunchError, resolved_config
    from reefl.models.checkpoints import CheckpointError
    from reefl.pretrain import PretrainError, check_options, default_output, pretrain

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
        output = check_options(args.output or default_output(cfg), args.epochs,
                               args.max_examples, args.threads)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        pretrain(cfg, args.epochs, output, args.max_examples,
                 log=lambda line: print(line, flush=True))
    except LaunchError as err:
        return _error(str(err), err.exit_code)
    except PretrainError as err:
        return _error(str(err), err.exit_code)
    except CheckpointError as err:
        return _error(f"pretrained: {err}", 2)
    except DataError as err:
        return _error(f"dataset: {err}", 2)
    except KeyboardInterrupt:
        return _error("interrupted; nothing was written", 130)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reefl.report_html import ReportError, write_report

    try:
        page = write_report(args.folder)
    except ReportError as err:
        return _error(f"report: {err}", 2)
    print(page)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "preset"):
        from reefl.launcher import LaunchError, with_preset

        try:
            args.run_config = with_preset(args.preset, args.run_config)
        except LaunchError as err:
            return _error(str(err), err.exit_code)
    with _sigterm_as_exit():
        if args.command == "run":
            return cmd_run(args)
        if args.command == "deploy":
            from reefl.deploy import cmd_deploy

            return cmd_deploy(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "costs":
            return cmd_costs(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "pretrain":
            return cmd_pretrain(args)
        if args.command in ANYTIME_COMMANDS:
            return ANYTIME_COMMANDS[args.command](args)
        if args.command == "report":
            return cmd_report(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
