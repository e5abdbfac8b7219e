"""A tier taken to a device: its bundle (safetensors + JSON, ``reefl predict`` and
``reefl.load`` read it alone) and, optionally, ONNX graphs, one per exit.

The ONNX export cuts the tier's model at its exits into **stages**: stage 0 takes the image
and runs the patch embedding and the blocks up to exit 0; stage k runs the blocks after exit
k−1 up to exit k. Each stage returns its exit's logits and, unless it is the last, what the
next stage needs: the tokens and, for an exit module that keeps one (Ree), the history of
class tokens [B, n, dim]. A device runs stage 0, reads the logits, and runs the next stage
only for the samples that are not confident yet, so an early exit costs only its own
stages. ``onnx-stages.json`` lists each stage's file, inputs and outputs, and
``OnnxTier`` runs them this way with onnxruntime (numpy, no torch).

The run's calibrated thresholds of the tier (``reefl calibrate`` before the export) go with
it: under ``calibration`` in reefl-model.json (``reefl predict`` and ``reefl.load`` use
them) and as ``policy`` in onnx-stages.json (``OnnxTier.predict`` uses them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reefl.anytime.model import DEFAULT_THRESHOLD, AnytimeModel, ModelLoadError, write_bundle
from reefl.anytime.policy import CRITERIA
from reefl.models import EarlyExitModel

STAGES_FILE = "onnx-stages.json"
ONNX_OPSET = 17


class ExportError(ModelLoadError):
    """An export that could not be written (one line); nothing of it is left on disk."""


class ExitStage(nn.Module):
    """The blocks ``first``..``last`` of an ``EarlyExitModel`` and the exit after ``last``,
    as one graph: (image) or (tokens[, history]) in; (logits[, tokens, history]) out."""

    def __init__(self, model: EarlyExitModel, first: int, last: int, history_in: int,
                 final: bool) -> None:
        super().__init__()
        self.model, self.first, self.last = model, first, last
        self.history_in, self.final = history_in, final

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.first == 0:
            h, history = self.model.backbone.embed(inputs[0]), []
        else:
            h = inputs[0]
            history = list(inputs[1].split(1, dim=1)) if self.history_in else []
        logits = None
        for index in range(self.first, self.last + 1):
            h = self.model.backbone.blocks[index](h)
            h, out = self.model.exits.after_block(index, h, history)
            logits = out if out is not None else logits
        assert logits is not None
        if self.final:
            return (logits,)
        return (logits, h, torch.cat(history, dim=1)) if history else (logits, h)


def stage_bounds(model: EarlyExitModel) -> list[tuple[int, int]]:
    """(first block, last block) of every stage: one stage per exit."""
    blocks = list(model.exits.exit_blocks)
    return [(0 if k == 0 else blocks[k - 1] + 1, b) for k, b in enumerate(blocks)]


def export_onnx(model: AnytimeModel, folder: Path) -> Path:
    """One ONNX file per exit of ``model`` and ``onnx-stages.json`` describing them;
    returns the JSON's path. Uses torch's TorchScript-based exporter (the dynamo one needs
    onnxscript, which is not a dependency); the batch dimension is dynamic."""
    network = model.model.eval()
    bounds = stage_bounds(network)
    size, channels = model.pipeline.size, model.pipeline.channels
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, channels, size, size),)
    stages: list[dict[str, Any]] = []
    history_in = 0
    for k, (first, last) in enumerate(bounds):
        final = k == len(bounds) - 1
        # in eval mode: the exporter restores the stage's mode afterwards, recursively, and a
        # stage left in training mode would put the network there (exit-standardise's running
        # statistics would then move with every example pass)
        stage = ExitStage(network, first, last, history_in, final).eval()
        inputs = ["image"] if k == 0 else ["tokens_in", "history_in"][: 1 + bool(history_in)]
        with torch.no_grad():
            outputs = stage(*example)
        names = ["logits", "tokens", "history"][: len(outputs)]
        path = folder / f"exit-{k}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(stage, example, str(path), input_names=inputs,
                              output_names=names, opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [*inputs, *names]})
        stages.append({"exit": k, "file": path.name, "blocks": [first, last],
                       "inputs": inputs, "outputs": names})
        example = outputs[1:]
        history_in = outputs[2].shape[1] if len(outputs) > 2 else 0
    calibrated = model.calibration
    policy = None if calibrated is None else {
        "criterion": calibrated["criterion"], "thresholds": calibrated["thresholds"],
        "source": calibrated["source"]}
    description = {"stages": stages, "exit_flops": model.exit_flops,
                   "input": {"channels": channels, "size": size}, "opset": ONNX_OPSET,
                   "policy": policy}
    (folder / STAGES_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return folder / STAGES_FILE


def export_tier(run_dir: str | os.PathLike[str], tier: int | None,
                folder: str | os.PathLike[str], onnx: bool = True) -> Path:
    """``reefl export``: the tier's bundle (and ONNX stages) into ``folder``, which must be
    new or empty; returns ``folder``. The tier's calibrated thresholds go with it when the
    run has them (``reefl calibrate`` first).

    Everything is written into a temporary folder beside ``folder`` and renamed to it once
    complete: a failed export (an ONNX error, an interrupt) leaves nothing behind."""
    from reefl.anytime.model import load

    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ExportError(f"export folder {folder} is not empty; choose a new one")
    model = load(run_dir, tier)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        write_bundle(model.bundle, staging)
        if onnx:
            try:
                export_onnx(model, staging)
            except Exception as err:  # the exporter's errors have no common type
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ExportError(f"ONNX export of tier {model.tier} failed "
                                  f"({type(err).__name__}: {first}); nothing was written "
                                  "(--no-onnx writes the safetensors and JSON only)") from err
        if folder.exists():
            folder.rmdir()  # empty, checked above
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


class OnnxTier:
    """An exported tier's ONNX stages run with onnxruntime, early exit included: what a
    device without torch runs. Inputs are model inputs (normalised, resized) as float32.
    ``folder``: the export folder, a ``str`` or ``os.PathLike``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        import onnxruntime

        folder = Path(folder).expanduser()
        self.folder = folder
        self.description = json.loads((folder / STAGES_FILE).read_text())
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.sessions = [onnxruntime.InferenceSession(str(folder / s["file"]), options,
                                                      providers=["CPUExecutionProvider"])
                         for s in self.description["stages"]]

    def exit_logits(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits (every stage run for every sample)."""
        logits, carried = [], [x]
        for stage, session in zip(self.description["stages"], self.sessions, strict=True):
            outputs = session.run(None, dict(zip(stage["inputs"], carried, strict=True)))
            logits.append(outputs[0])
            carried = outputs[1:]
        return logits

    @property
    def policy(self) -> dict[str, Any] | None:
        """The calibrated ``criterion`` and ``thresholds`` (one per exit) the tier was
        exported with, or None when its run was not calibrated before the export."""
        return self.description.get("policy")

    def predict(self, x: np.ndarray, threshold: float | Sequence[float] | None = None,
                criterion: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, exit taken) per sample: stage k runs only for the samples that
        no earlier exit was confident about. ``threshold``: one for every exit or one per
        exit; without it, the exported calibrated thresholds (``policy``) when there are
        some and ``criterion`` is theirs or None, else ``DEFAULT_THRESHOLD`` (0.9)."""
        if threshold is None and self.policy is not None \
                and criterion in (None, self.policy["criterion"]):
            threshold, criterion = self.policy["thresholds"], self.policy["criterion"]
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        criterion = criterion or "maxprob"
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}")
        count = len(self.sessions)
        limits = ([float(threshold)] * count if isinstance(threshold, (int, float))
                  else [float(t) for t in threshold])
        if len(limits) != count:
            raise ValueError(f"thresholds must be one number or {count} (one per exit); "
                             f"got {len(limits)}")
        n = len(x)
        labels, exits = np.zeros(n, np.int64), np.zeros(n, np.int64)
        going, carried = np.arange(n), [x]
        last = len(self.sessions) - 1
        for k, (stage, session) in enumerate(zip(self.description["stages"], self.sessions,
                                                 strict=True)):
            outputs = session.run(None, dict(zip(stage["inputs"], carried, strict=True)))
            score = _confidence(outputs[0], criterion)
            here = score >= limits[k] if k < last else np.ones(len(score), dtype=bool)
            labels[going[here]] = outputs[0][here].argmax(-1)
            exits[going[here]] = k
            going = going[~here]
            carried = [o[~here] for o in outputs[1:]]
            if len(going) == 0:
                break
        return labels, exits


def _confidence(logits: np.ndarray, criterion: str) -> np.ndarray:
    """``policy.confidence`` in numpy (maxprob, or 1 − normalised entropy)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    if criterion == "maxprob":
        return probs.max(axis=-1)
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(axis=-1)
    return np.clip(1.0 - entropy / np.log(logits.shape[-1]), 0.0, 1.0)
