"""What ``reefl predict`` reads and writes: inputs from files, folders or a run's own split,
the policy from the command line or the run's calibration, and one row per sample."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reefl.anytime.model import (
    DEFAULT_THRESHOLD,
    AnytimeModel,
    PredictError,
    Prediction,
    decode_files,
    input_files,
    is_bundle_folder,
)
from reefl.anytime.policy import ExitPolicy

SPLITS = ("test", "validation")
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass
class Inputs:
    """Model inputs [N, C, H, W], a name per sample, and labels when they are known."""

    names: list[str]
    x: torch.Tensor
    labels: torch.Tensor | None = None


def parse_flops(text: str) -> float:
    """A FLOPs count such as ``250000``, ``250k``, ``1.5M`` or ``4.6G``."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not found:
        raise PredictError(f"--budget must be a number of FLOPs such as 250k, 1.5M or 4.6G; "
                           f"got '{text}'")
    return float(found.group(1)) * _SCALE[found.group(2).lower()]


def parse_thresholds(text: str) -> float | list[float]:
    """One threshold, or one per exit separated by commas."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise PredictError(f"--threshold must be a number or one number per exit separated "
                           f"by commas; got '{text}'") from None
    return values[0] if len(values) == 1 else values


def read_files(model: AnytimeModel, paths: list[Path]) -> Inputs:
    """Model inputs from image or audio files or folders of them (images to the model's
    channels; audio to log-mel features)."""
    files = input_files(paths, model.pipeline.kind)
    return Inputs([str(f) for f in files], model.inputs(decode_files(model, files)))


def read_split(run_dir: Path, split: str) -> Inputs:
    """A split of the run's own data, with its labels: ``test`` or ``validation``."""
    from reefl.config import RunConfig
    from reefl.data import held_out_loader, test_loader
    from reefl.federation.inputs import run_data

    if split not in SPLITS:
        raise PredictError(f"--split must be one of {', '.join(SPLITS)}; got '{split}'")
    config = run_dir / "config.json"
    if not config.is_file():
        raise PredictError(f"--split needs a run folder (with config.json); {run_dir} is not "
                           "one (an exported tier carries no data)")
    cfg = RunConfig.from_flat(json.loads(config.read_text()))
    data, pipeline, _ = run_data(cfg)
    if split == "validation":
        if len(data.validation_indices) == 0:
            raise PredictError(f"{run_dir} has no validation split (validation-fraction=0)")
        loader, indices = held_out_loader(data, pipeline, data.validation_indices,
                                          cfg.eval_batch_size), data.validation_indices
    else:
        loader, indices = test_loader(data, pipeline, cfg.eval_batch_size), data.test_indices
    xs, ys = zip(*loader, strict=True)
    return Inputs([f"{split}[{i}]" for i in indices], torch.cat(xs), torch.cat(ys))


def calibrated_policy(model: AnytimeModel, source: Path, criterion: str | None
                      ) -> tuple[ExitPolicy | None, str]:
    """The calibrated operating point of the model's tier (carried by the model: read from
    the run's calibration.json when it was loaded or exported), and a line saying where it
    came from; or None and a line saying why there is none and how to get one."""
    record = model.calibration
    if record is None:
        if is_bundle_folder(source):
            run = model.bundle.info.get("source_run", "RUN_DIR")
            return None, (f"the tier was exported without calibrated thresholds: run reefl "
                          f"calibrate {run}, then reefl export again")
        return None, f"no calibration.json: see reefl calibrate {source}"
    if criterion is not None and criterion != record["criterion"]:
        return None, (f"the calibration is for {record['criterion']}, not --criterion "
                      f"{criterion}")
    return (ExitPolicy.build(model.num_exits, record["thresholds"], record["criterion"]),
            f"calibrated thresholds of tier {model.tier} ({record['source']})")


def choose_policy(model: AnytimeModel, source: Path, threshold: str | None,
                  criterion: str | None, budget: str | None) -> tuple[ExitPolicy, str]:
    """The policy to predict with, and a line saying where it came from: ``--threshold``
    if given, else the calibrated operating point the model carries (a run folder's
    calibration.json, or the one an exported tier took with it), else ``DEFAULT_THRESHOLD``;
    ``--budget`` caps the deepest exit in every case."""
    flops = parse_flops(budget) if budget is not None else None
    chosen, why = (None, "--threshold") if threshold is not None else \
        calibrated_policy(model, source, criterion)
    if chosen is not None:
        values: float | list[float] = list(chosen.thresholds)
        criterion = chosen.criterion
    else:
        values = parse_thresholds(threshold) if threshold is not None else DEFAULT_THRESHOLD
        if threshold is None:
            why = f"default threshold {DEFAULT_THRESHOLD} ({why})"
    try:
        policy = ExitPolicy.build(model.num_exits, values, criterion or "maxprob",
                                  model.exit_flops, flops)
    except ValueError as err:
        raise PredictError(str(err)) from None
    if flops is not None:
        why += f"; budget {flops:,.0f} FLOPs: exits up to {policy.last_exit}"
    return policy, why


def rows(inputs: Inputs, prediction: Prediction, class_names: list[str]
         ) -> list[dict[str, Any]]:
    """One dict per sample: name, class, exit, confidence, FLOPs (and label if known)."""
    out = []
    for i, name in enumerate(inputs.names):
        label = int(prediction.labels[i])
        row = {"input": name, "prediction": class_names[label] if class_names else label,
               "exit": int(prediction.exits[i]), "confidence": float(prediction.confidence[i]),
               "flops": int(prediction.flops[i])}
        if inputs.labels is not None:
            row["label"] = class_names[int(inputs.labels[i])] if class_names else \
                int(inputs.labels[i])
        out.append(row)
    return out


def summary(inputs: Inputs, prediction: Prediction, num_exits: int) -> dict[str, Any]:
    """Samples, mean FLOPs per image, share per exit and, with labels, accuracy (%)."""
    shares = np.bincount(prediction.exits.numpy(), minlength=num_exits) / len(inputs.names)
    result: dict[str, Any] = {"samples": len(inputs.names),
                              "mean_flops": float(prediction.flops.double().mean()),
                              "exit_share": shares.tolist()}
    if inputs.labels is not None:
        result["accuracy"] = 100.0 * float((prediction.labels == inputs.labels).double().mean())
    return result


def write_rows(path: Path, table: list[dict[str, Any]]) -> Path:
    """The rows as CSV (``.csv``) or JSON lines (anything else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table))
    return path

