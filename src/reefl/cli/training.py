"""``reefl run``, ``deploy``, ``compare`` and ``pretrain``: parsing and exit codes over
``launch.simulation.run_app``, ``launch.deployment.deploy``, ``launch.comparison.main_compare``
and ``pretrain.pretrain``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from reefl.cli.common import (
    FEDERATION_CONFIG_HELP,
    RUN_CONFIG_HELP,
    add_output_options,
    add_run_config_options,
    error,
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The sub-commands of this module, each with its handler as ``handler``."""
    _add_run(commands)
    _add_deploy(commands)
    _add_compare(commands)
    _add_pretrain(commands)


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run one federated training in a local Flower simulation",
        description="Run the Flower app once (a thin wrapper over `flwr run <app-dir>`).",
    )
    add_run_config_options(run)
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
    add_output_options(run)
    run.set_defaults(handler=cmd_run)


def _add_deploy(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser(
        "deploy",
        help="run the app once on a local Deployment Engine (SuperLink + SuperNodes)",
        description=(
            "Start flower-superlink and --nodes flower-supernode processes on this machine "
            "(optionally with TLS and SuperNode authentication), run the app once with "
            "`flwr run`, print the final table and stop every process."
        ),
    )
    deploy.add_argument("--nodes", "-n", type=_positive_int, default=3, metavar="N",
                        help="number of SuperNodes, one per partition id 0..N-1 (default 3; "
                             "num-clients defaults to N)")
    deploy.add_argument("--tiers", default=None, metavar="T0,T1,...",
                        help="each SuperNode's tier (node config tier), in partition order; "
                             "default: the run config's tier-rule")
    deploy.add_argument("--tls", action="store_true",
                        help="TLS with a CA and server certificate made here")
    deploy.add_argument("--auth", action="store_true",
                        help="SuperNode authentication: a key pair per SuperNode, registered "
                             "with `flwr supernode register` (implies --tls)")
    deploy.add_argument("--fleet-address", default="127.0.0.1", metavar="IP[:PORT]",
                        help="where SuperNodes connect: the Fleet gateway, which serves only "
                             "the Fleet API (default 127.0.0.1, a free port); the SuperLink "
                             "itself, whose Control API registers keys and starts runs, "
                             "listens on this host's loopback only")
    deploy.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="keep FLWR_HOME, certificates, keys and every process's log in "
                             "DIR (default: a temporary folder, removed afterwards)")
    deploy.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the interrupted run in RUN_DIR from its checkpoint, "
                             "with exactly its config.json (as `reefl run --resume`)")
    add_run_config_options(deploy)
    add_output_options(deploy)
    deploy.set_defaults(handler=cmd_deploy)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_compare(commands: argparse._SubParsersAction) -> None:
    from reefl.launch.comparison import ENTRY_SYNTAX_HELP

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
    add_run_config_options(
        compare, RUN_CONFIG_HELP + "; applied to every run, before the entry's own overrides "
        "(method, seed, output-dir and run-name are set by compare)")
    compare.add_argument(
        "--federation-config", action="append", default=[], metavar="CONFIG",
        help=FEDERATION_CONFIG_HELP,
    )  # fmt: skip
    compare.add_argument(
        "--resume", action="store_true",
        help="reuse the run folders that hold a finished run of the same config, and continue "
             "those with a checkpoint of it (without --resume, existing run folders are an "
             "error)",
    )  # fmt: skip
    add_output_options(compare, quiet=False)
    compare.set_defaults(handler=cmd_compare)


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
    add_run_config_options(pretrain)
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
    pretrain.set_defaults(handler=cmd_pretrain)


def _view(args: argparse.Namespace):  # noqa: ANN202 - a LogView, imported lazily
    """What the terminal shows of Flower's log: every line (-v), nothing (-q), or the
    progress line (default: None lets the launch choose it)."""
    from reefl.outputs.progress import LogView, StreamView

    if args.verbose:
        return StreamView()
    return LogView() if getattr(args, "quiet", False) else None


def _launched(launch: Callable[[], object], workdir_hint: bool = False) -> int:
    """Run ``launch`` (a run on Flower); its exit code: 0, the LaunchError's code with its
    line (``workdir_hint``: and where the processes' logs can be kept), or 130 after
    Ctrl-C with how the run can go on."""
    from reefl.launch.errors import LaunchError, RunConfigError, RunInterrupted

    try:
        launch()
    except LaunchError as err:
        started = not isinstance(err, RunConfigError)  # a config error stops before any process
        hint = " (--workdir DIR keeps every process's log)" if workdir_hint and started else ""
        return error(f"{err}{hint}", err.exit_code)
    except KeyboardInterrupt as err:
        hint = f"; {err.hint()}" if isinstance(err, RunInterrupted) else ""
        return error(f"interrupted; all Flower processes stopped{hint}", 130)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reefl.launch.simulation import run_app

    return _launched(lambda: run_app(
        args.run_config, app_dir=args.app, federation_overrides=args.federation_config,
        quiet=args.quiet, resume=args.resume, view=_view(args)))


def cmd_deploy(args: argparse.Namespace) -> int:
    from reefl.launch.deployment import deploy, parse_tiers

    return _launched(lambda: deploy(
        args.run_config, args.nodes, parse_tiers(args.tiers, args.nodes),
        tls=args.tls or args.auth, auth=args.auth, app_dir=args.app, workdir=args.workdir,
        resume=args.resume, quiet=args.quiet, view=_view(args),
        fleet_address=args.fleet_address),
        workdir_hint=args.workdir is None)


def cmd_compare(args: argparse.Namespace) -> int:
    from reefl.launch.comparison import main_compare
    from reefl.launch.errors import LaunchError

    try:
        return main_compare(
            args.methods, args.seeds, args.output_dir, args.run_config,
            args.federation_config, app_dir=args.app, resume=args.resume, verbose=args.verbose,
        )  # fmt: skip
    except LaunchError as err:
        return error(str(err), err.exit_code)
    except KeyboardInterrupt:
        return error("interrupted; all Flower processes stopped (finished runs are in the "
                     "comparison files; the same command with --resume goes on)", 130)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from reefl.data import DataError
    from reefl.launch.errors import LaunchError
    from reefl.launch.run_config import resolved_config
    from reefl.models.checkpoints import CheckpointError
    from reefl.pretrain import PretrainError, check_options, default_output, pretrain

    try:
        cfg = resolved_config(args.run_config, app_dir=args.app)
        output = check_options(args.output or default_output(cfg), args.epochs,
                               args.max_examples, args.threads)
        pretrain(cfg, args.epochs, output, args.max_examples, threads=args.threads,
                 log=lambda line: print(line, flush=True))
    except (LaunchError, PretrainError) as err:
        return error(str(err), err.exit_code)
    except CheckpointError as err:
        return error(f"pretrained: {err}", 2)
    except DataError as err:
        return error(f"dataset: {err}", 2)
    except KeyboardInterrupt:
        return error("interrupted; nothing was written", 130)
    return 0
