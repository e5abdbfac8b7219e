"""``reefl predict``, ``calibrate`` and ``export``: parsing and exit codes over
``anytime.model.load``/``predict``, ``anytime.calibrate`` and ``anytime.export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from reefl.anytime import CRITERIA
from reefl.cli.common import error

PREDICT_HELP = """\
Early-exit prediction with a trained run folder or an exported tier: every sample stops at
the first exit whose confidence reaches its threshold (or at the last exit the --budget
allows) and nothing deeper is computed for it. Thresholds: --threshold, else the run's
calibrated operating point (reefl calibrate), else 0.9."""


def _check_predict(args: argparse.Namespace) -> str | None:
    if args.inputs and args.split:
        return "give INPUT files or folders or --split, not both"
    if not args.inputs and not args.split:
        return "give INPUT files or folders to predict, or --split test|validation"
    return None


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register predict, calibrate and export (all their parser construction is here)."""
    predict = commands.add_parser("predict", help="early-exit prediction with a trained run",
                          description=PREDICT_HELP, check=_check_predict)
    predict.add_argument("model", type=Path, metavar="MODEL",
                         help="a finished run folder, or a tier folder from reefl export")
    predict.add_argument("inputs", type=Path, nargs="*", metavar="INPUT",
                         help="image or audio files, or folders of them")
    predict.add_argument("--split", choices=("test", "validation"),
                         help="predict a split of the run's own data instead (prints accuracy)")
    predict.add_argument("--tier", type=int, default=None,
                         help="the tier whose sub-model predicts (run folder; default the "
                              "deepest)")
    predict.add_argument("--threshold", metavar="T",
                         help="confidence threshold, one for all exits or one per exit "
                              "separated by commas (0: always exit 0; > 1: never stop early)")
    predict.add_argument("--criterion", choices=CRITERIA, default=None,
                         help="confidence: maxprob (largest softmax probability, default) or "
                              "entropy (1 - normalised entropy)")
    predict.add_argument("--budget", metavar="FLOPS",
                         help="most FLOPs per image, e.g. 250k, 1.5M, 4.6G: no exit deeper "
                              "than the budget allows (exit 0 if even it costs more)")
    predict.add_argument("--output", "-o", type=Path,
                         help="write one row per sample (.csv, else JSON lines)")
    predict.add_argument("--batch-size", type=int, default=256)
    predict.add_argument("--quiet", "-q", action="store_true",
                         help="print only the summary, not one line per sample")

    calibrate = commands.add_parser(
        "calibrate",
        help="set exit thresholds on the validation split; accuracy vs FLOPs",
        description="Set every tier's exit thresholds on the run's validation split "
                    "(validation-fraction > 0; never the test set), MSDNet's budgeted way, and "
                    "write calibration.json, accuracy_vs_flops.csv and .png. On a comparison "
                    "folder: every run, and one plot of every method's curve.")
    calibrate.add_argument("folder", type=Path, metavar="RUN_OR_COMPARISON_DIR")
    calibrate.add_argument("--criterion", choices=CRITERIA, default="maxprob")
    target = calibrate.add_mutually_exclusive_group()
    target.add_argument("--target-accuracy", type=float, metavar="PERCENT",
                        help="each tier's operating point: the cheapest reaching this "
                             "validation accuracy")
    target.add_argument("--target-flops", metavar="FLOPS",
                        help="each tier's operating point: the most accurate within this "
                             "average FLOPs per image (e.g. 300k)")
    calibrate.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS",
                           help="without a target: the cheapest point within this many "
                                "accuracy points of the tier's best (default 1.0)")

    export = commands.add_parser(
        "export",
        help="write one tier's sub-model to a folder (safetensors + JSON, ONNX)",
        description="Write one tier's sub-model, its regime merged (LoRA and SSF folded into "
                    "the weights), with what it needs to predict alone: reefl-model.json, "
                    "model.safetensors and one ONNX graph per exit (onnx-stages.json). The "
                    "tier's calibrated thresholds go with it when the run has them: run "
                    "reefl calibrate RUN_DIR first.")
    export.add_argument("run", type=Path, metavar="RUN_DIR")
    export.add_argument("--tier", type=int, default=None, help="default: the deepest")
    export.add_argument("--output", "-o", type=Path, required=True, metavar="FOLDER",
                        help="a new (or empty) folder")
    export.add_argument("--no-onnx", action="store_true", help="safetensors and JSON only")
    predict.set_defaults(handler=cmd_predict)
    calibrate.set_defaults(handler=cmd_calibrate)
    export.set_defaults(handler=cmd_export)


def _fail(message: str, code: int = 2) -> int:
    return error(message, code)


def cmd_predict(args: argparse.Namespace) -> int:
    from reefl.anytime.model import ModelLoadError, load
    from reefl.anytime.predict import (
        PredictError,
        choose_policy,
        read_files,
        read_split,
        rows,
        summary,
        write_rows,
    )

    try:
        model = load(args.model, args.tier)
        inputs = read_split(args.model, args.split) if args.split else \
            read_files(model, args.inputs)
        policy, why = choose_policy(model, args.model, args.threshold, args.criterion,
                                    args.budget)
        prediction = model.predict(inputs.x, policy=policy, batch_size=args.batch_size)
    except (ModelLoadError, PredictError) as err:
        return _fail(str(err))
    table = rows(inputs, prediction, model.class_names)
    print(f"reefl predict: tier {model.tier} ({model.num_exits} exits), {policy.criterion}; "
          f"{why}")
    if not args.quiet:
        for row in table:
            label = f"  label {row['label']}" if "label" in row else ""
            print(f"{row['input']}\t{row['prediction']}\texit {row['exit']}\t"
                  f"confidence {row['confidence']:.3f}\t{row['flops'] / 1e6:.3f} MFLOPs{label}")
    result = summary(inputs, prediction, model.num_exits)
    shares = " ".join(f"{100 * s:.1f}%" for s in result["exit_share"])
    accuracy = f", accuracy {result['accuracy']:.2f}%" if "accuracy" in result else ""
    print(f"{result['samples']} samples: mean {result['mean_flops'] / 1e6:.3f} MFLOPs per "
          f"image (deepest exit {model.exit_flops[-1] / 1e6:.3f}), exits taken [{shares}]"
          f"{accuracy}")
    if args.output is not None:
        print(f"wrote {write_rows(args.output, table)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from reefl.anytime.calibrate import (
        CURVE_PNG,
        calibrate_comparison,
        calibrate_run,
        operating_points_table,
    )
    from reefl.anytime.model import ModelLoadError, is_bundle_folder
    from reefl.anytime.predict import PredictError, parse_flops
    from reefl.outputs.tables import print_table

    if is_bundle_folder(args.folder):
        run = _bundle_info(args.folder).get("source_run", "RUN_DIR")
        return _fail(f"{args.folder} is an exported tier, which carries no data to calibrate "
                     f"on: run reefl calibrate {run} (its run folder), then reefl export "
                     "again; the export takes the calibrated thresholds with it")

    try:
        flops = parse_flops(args.target_flops) if args.target_flops else None
        options = {"criterion": args.criterion, "target_accuracy": args.target_accuracy,
                   "target_flops": flops, "tolerance": args.tolerance}
        if (args.folder / "comparison.json").is_file():
            records = calibrate_comparison(args.folder, **options)
        elif (args.folder / "config.json").is_file():
            record = calibrate_run(args.folder, **options)
            records = {record["method"]: [record]}
        else:
            return _fail(f"{args.folder} is neither a run folder (config.json) nor a "
                         "comparison folder (comparison.json)")
    except (ModelLoadError, PredictError) as err:
        return _fail(str(err))
    for label, runs in records.items():
        for record in runs:
            print(f"{label} · seed {record['seed']}", flush=True)
            print_table(operating_points_table(record))
    print(f"wrote {args.folder / CURVE_PNG}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from reefl.anytime.export import export_tier
    from reefl.anytime.model import DEFAULT_THRESHOLD, ModelLoadError

    try:
        folder = export_tier(args.run, args.tier, args.output, onnx=not args.no_onnx)
    except ModelLoadError as err:
        return _fail(str(err))
    for path in sorted(folder.iterdir()):
        print(f"wrote {path}")
    info = _bundle_info(folder)
    calibrated = info.get("calibration")
    if calibrated is None:
        print(f"no calibrated thresholds: reefl predict will use {DEFAULT_THRESHOLD} unless "
              f"given --threshold (to carry them: reefl calibrate {args.run}, then export "
              "again)")
    else:
        print(f"with the calibrated thresholds of tier {info['tier']} "
              f"({calibrated['criterion']}, from {calibrated['source']})")
    return 0


def _bundle_info(folder: Path) -> dict:
    """An exported tier's reefl-model.json (without loading its weights)."""
    import json

    from reefl.anytime.model import BUNDLE_FILE

    return json.loads((folder / BUNDLE_FILE).read_text())
