"""A trained tier as a model that predicts early: ``load`` a run folder or an exported tier.

A **tier bundle** is everything one tier's sub-model needs to predict on its own: the
model's config (the run's, less what only training and data loading read), the task, the
input pipeline (size, channels, normalisation), the class names, every exit's FLOPs, and the
weights, with LoRA and SSF folded into the backbone's own weights (``merge_regime``). A run
folder gives one for any tier; ``reefl export`` writes one to disk; both load the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reefl.anytime.policy import ExitPolicy, confidence
from reefl.data import InputPipeline
from reefl.methods import TaskSpec, build_method
from reefl.models import EarlyExitModel

BUNDLE_FILE = "reefl-model.json"
WEIGHTS_FILE = "model.safetensors"
BUNDLE_FORMAT = "reefl-tier/1"
CALIBRATION_FILE = "calibration.json"
DEFAULT_THRESHOLD = 0.9
"""The threshold of every exit when none is given and the model carries no calibration."""
TRAINING_ONLY_KEYS = (
    "dataset", "partitioner", "partition-by", "image-column", "audio-column", "label-column",
    "local-test-fraction", "validation-fraction", "train-examples", "test-examples",
    "pretrained", "output-dir", "run-name", "resume", "personalised-epochs",
)
"""Run-config keys that do not change a trained model's computation (data, the starting
weights, where outputs go): left at their defaults in a bundle, so that it loads on a
machine that has neither the data nor the pretrained file."""


class ModelLoadError(ValueError):
    """A folder that is not a run with a model, or an unusable tier (one line)."""


@dataclass(frozen=True)
class Prediction:
    """Per sample: predicted class, the exit taken, its confidence there, and the FLOPs
    spent to reach it."""

    labels: torch.Tensor
    exits: torch.Tensor
    confidence: torch.Tensor
    flops: torch.Tensor


@dataclass
class TierBundle:
    """A tier's sub-model and what it needs to predict alone (see the module docstring)."""

    info: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def pipeline(self) -> InputPipeline:
        p = self.info["pipeline"]
        return InputPipeline(p["kind"], p["size"], p["channels"], tuple(p["mean"]),
                             tuple(p["std"]))

    @property
    def task(self) -> TaskSpec:
        """Classes and input channels of the model."""
        return TaskSpec(**self.info["task"])

    def build(self) -> EarlyExitModel:
        """The tier's model with the bundle's weights (no random initialisation)."""
        from reefl.config import RunConfig

        cfg = RunConfig.from_flat(self.info["model_config"])
        method = build_method(cfg, self.task)
        with torch.device("meta"):
            model = method.build_model(self.info["tier"])
        model.load_state_dict(self.state, strict=True, assign=True)
        return model.eval()


class AnytimeModel:
    """One tier's trained sub-model, for early-exit inference.

    It carries the tier's calibrated thresholds (``calibration``) when the run was calibrated
    (``reefl calibrate``) before it was loaded or exported; ``predict`` uses them by default.

    ``exit_logits`` computes every exit (for calibration and evaluation); ``predict`` stops
    each sample at its first confident exit and computes nothing deeper for it.
    ``exit_flops[k]`` is the cost of one image up to exit k, every Ree pass on the way
    included (what ``reefl costs`` prints as the forward FLOPs of tier k).
    """

    def __init__(self, bundle: TierBundle) -> None:
        self.bundle = bundle
        self.model = bundle.build()
        self.pipeline = bundle.pipeline
        self.exit_flops: list[int] = list(bundle.info["exit_flops"])
        self.class_names: list[str] = list(bundle.info["class_names"])

    @property
    def num_exits(self) -> int:
        return len(self.exit_flops)

    @property
    def tier(self) -> int:
        return int(self.bundle.info["tier"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        """This tier's calibrated operating point (``reefl calibrate``): ``criterion``,
        ``thresholds`` (one per exit), the validation/test numbers behind them and ``source``
        (the calibration.json they came from); None when the run was not calibrated (before
        it was loaded or exported)."""
        return self.bundle.info.get("calibration")

    def inputs(self, data: Any) -> torch.Tensor:
        """Model inputs [N, C, size, size] (float32: normalised, resized, channels matched, as
        evaluation prepares them) from any of:

        - a ``torch.Tensor`` as the run's data stores examples, channels first: images
          [N, C, H, W] (or one image [C, H, W]) with pixel values 0-255 (uint8, or float),
          or, for an audio model, log-mel features [N, 1, frames, mel bins];
        - a ``numpy.ndarray`` image as PIL and numpy give them, channels last and uint8:
          one image [H, W] or [H, W, C], or a batch [N, H, W, C] (C is 1, 3 or 4; alpha is
          dropped); a 3-D array whose last dimension is not 1, 3 or 4 is a batch of grey
          images [N, H, W]. A channels-first array is read as a tensor:
          ``torch.from_numpy(array)``. For an audio model, features as for a tensor;
        - a PIL image;
        - a path (``str`` or ``os.PathLike``) to an image (audio) file or to a folder of
          them, searched recursively in sorted order, decoded as ``reefl predict`` decodes
          files;
        - a list or tuple of any of these, each of its own size: their inputs in order.

        Images of any size are resized to the model's; RGB is averaged to grey for a model
        of grey images, grey repeated for one of RGB images."""
        kind = self.pipeline.kind
        if isinstance(data, (str, os.PathLike)):
            return self.inputs(decode_files(self, input_files([Path(data)], kind)))
        if isinstance(data, (list, tuple)):
            if not data:
                raise ValueError("no inputs: the list is empty")
            return torch.cat([self.inputs(item) for item in data])
        if isinstance(data, np.ndarray):
            data = _channels_last_images(data) if kind == "image" else torch.from_numpy(data)
        elif not isinstance(data, torch.Tensor):
            data = _pil_image(data)
        if kind == "image":
            if data.dim() == 3:
                data = data.unsqueeze(0)
            if data.dim() != 4:
                raise ValueError(f"image tensors must be [N, C, H, W] or [C, H, W]; got shape "
                                 f"{tuple(data.shape)}")
            data = match_channels(data, len(self.pipeline.mean))
        return self.pipeline(data, None)

    @torch.no_grad()
    def exit_logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits of every exit [K, N, classes] for model inputs ``x``."""
        parts = [torch.stack([z.float() for z in self.model(x[i:i + batch_size])])
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts, dim=1)

    def policy(self, threshold: float | Sequence[float] | None = None,
               criterion: str | None = None, budget: float | None = None) -> ExitPolicy:
        """An ``ExitPolicy`` for this model: one threshold or one per exit, the criterion,
        and a budget in FLOPs per image (the deepest exit it affords is the last).

        Without ``threshold``: the calibrated thresholds (``calibration``) when the model has
        them and ``criterion`` is theirs or None, else ``DEFAULT_THRESHOLD``; the criterion
        defaults to the calibration's, else maxprob."""
        calibrated = self.calibration
        if (threshold is None and calibrated is not None
                and criterion in (None, calibrated["criterion"])):
            threshold, criterion = calibrated["thresholds"], calibrated["criterion"]
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        return ExitPolicy.build(self.num_exits, threshold, criterion or "maxprob",
                                self.exit_flops, budget)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, threshold: float | Sequence[float] | None = None,
                criterion: str | None = None, budget: float | None = None,
                policy: ExitPolicy | None = None, batch_size: int = 256) -> Prediction:
        """Early-exit predictions for model inputs ``x`` (see ``inputs``): each sample stops
        at its first exit whose confidence reaches the threshold, within the budget (the
        defaults as in ``policy``: the calibrated thresholds if any); or as ``policy`` says,
        when given."""
        policy = policy or self.policy(threshold, criterion, budget)
        if len(policy.thresholds) != self.num_exits:
            raise ValueError(f"the policy has {len(policy.thresholds)} thresholds and the "
                             f"model {self.num_exits} exits")
        logits, exits = [], []
        for i in range(0, len(x), batch_size):
            out, taken = self.model.forward_until(x[i:i + batch_size], policy.stops)
            logits.append(out.float())
            exits.append(taken)
        out, taken = torch.cat(logits), torch.cat(exits)
        flops = torch.tensor(self.exit_flops, dtype=torch.long)[taken]
        return Prediction(out.argmax(-1), taken, confidence(out, policy.criterion), flops)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Images [N, C, H, W] with ``channels`` channels: RGB averaged to grey (uint8 stays
    uint8), grey repeated."""
    if images.shape[1] == channels:
        return images
    if channels == 1:
        grey = images.float().mean(dim=1, keepdim=True)
        return grey.round().to(torch.uint8) if images.dtype == torch.uint8 else grey
    if images.shape[1] != 1:
        raise ValueError(f"images have {images.shape[1]} channels; the model takes "
                         f"{channels} (or 1, repeated)")
    return images.expand(-1, channels, -1, -1).contiguous()


def _channels_last_images(array: np.ndarray) -> torch.Tensor:
    """uint8 [N, C, H, W] from a numpy image or batch laid out channels last (see
    ``AnytimeModel.inputs``)."""
    if array.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (0-255, as PIL and image readers give "
                         f"them); got {array.dtype}: for another scale pass a tensor "
                         "[N, C, H, W] of 0-255 values")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
    elif array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be [H, W], [H, W, C] or [N, H, W, C] with C 1, 3 "
                         f"or 4 (channels last); got shape {array.shape}: for a "
                         "channels-first array pass torch.from_numpy(array)")
    images = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # a copy of its own
    return images[:, :3].contiguous() if images.shape[1] == 4 else images.contiguous()


def _pil_image(image: Any) -> torch.Tensor:
    """uint8 [1, C, H, W] from a PIL image (grey modes to 1 channel, any other to RGB)."""
    from PIL import Image

    from reefl.data.decode import GREY_MODES

    if not isinstance(image, Image.Image):
        raise TypeError("inputs takes a tensor, a numpy array, a PIL image, a path or a list "
                        f"of them; got {type(image).__name__}")
    grey = image.mode in GREY_MODES
    return _channels_last_images(np.asarray(image.convert("L" if grey else "RGB")))


# -- bundles from a run folder and from disk ----------------------------------------------


def is_bundle_folder(path: Path) -> bool:
    return (path / BUNDLE_FILE).is_file()


def load(path: str | Path, tier: int | None = None) -> AnytimeModel:
    """The model of a run folder (``tier``: which tier's sub-model; default the deepest)
    or of an exported tier folder (``reefl export``), ready to ``predict``."""
    path = Path(path).expanduser()
    if not is_bundle_folder(path):
        return AnytimeModel(run_bundle(path, tier))
    bundle = read_bundle(path)
    if tier is not None and tier != bundle.info["tier"]:
        raise ModelLoadError(f"{path} holds tier {bundle.info['tier']} only; got --tier {tier}")
    return AnytimeModel(bundle)


def _run_files(run_dir: Path) -> tuple[dict[str, Any], Path]:
    config, weights = run_dir / "config.json", run_dir / WEIGHTS_FILE
    for needed in (config, weights):
        if not needed.is_file():
            raise ModelLoadError(f"{run_dir} is not a finished run folder or an exported tier: "
                                 f"{needed.name} is missing")
    return json.loads(config.read_text()), weights


def run_bundle(run_dir: Path, tier: int | None = None) -> TierBundle:
    """The bundle of ``tier`` (default: the deepest) of the finished run in ``run_dir``:
    its weights cut from the final global model, the regime merged where it folds, the input
    pipeline and class names from the run's data (its cache), the FLOPs counted."""
    from safetensors.torch import load_file

    from reefl.config import RunConfig
    from reefl.federation.inputs import run_data
    from reefl.models.finetune import merge_regime
    from reefl.outputs.accounting import exit_flops_in

    flat, weights = _run_files(run_dir)
    cfg = RunConfig.from_flat(flat)
    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    tier = method.num_exits - 1 if tier is None else tier
    if not 0 <= tier < method.num_exits:
        raise ModelLoadError(f"tier must be in 0..{method.num_exits - 1} for {run_dir}; "
                             f"got {tier}")
    state = method.tier_state(load_file(str(weights)), tier)
    merged, regime = merge_regime(state, method.regime)
    model_config = {**{k: v for k, v in flat.items() if k not in TRAINING_ONLY_KEYS},
                    "regime": regime}
    info = {
        "format": BUNDLE_FORMAT, "tier": tier, "method": cfg.method, "source_run": str(run_dir),
        "model_config": model_config, "task": dataclasses.asdict(task),
        "exit_ids": method.exit_ids(tier),
        "exit_blocks": [method.exit_blocks[k] for k in method.exit_ids(tier)],
        "pipeline": {"kind": pipeline.kind, "size": pipeline.size,
                     "channels": pipeline.channels, "mean": list(pipeline.mean),
                     "std": list(pipeline.std)},
        "class_names": list(data.spec.class_names),
    }
    calibration = tier_calibration(run_dir, tier)
    if calibration is not None:
        info["calibration"] = calibration
    bundle = TierBundle(info, merged)
    info["exit_flops"] = exit_flops_in(bundle.build(), task.in_chans, cfg.img_size)
    return bundle


CALIBRATION_KEYS = ("point", "thresholds", "validation_accuracy", "validation_flops",
                    "test_accuracy", "test_flops")


def tier_calibration(run_dir: Path, tier: int) -> dict[str, Any] | None:
    """The operating point ``reefl calibrate`` chose for ``tier`` of the run (its
    calibration.json): the criterion, one threshold per exit, the validation and test
    numbers behind it, and the file it came from; None when the run has none for the tier."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    chosen = [t for t in record.get("tiers", []) if t.get("tier") == tier]
    if not chosen:
        return None
    return {"criterion": record["criterion"], **{k: chosen[0][k] for k in CALIBRATION_KEYS},
            "source": str(path)}


def read_bundle(folder: Path) -> TierBundle:
    """A bundle ``write_bundle`` wrote."""
    from safetensors.torch import load_file

    info = json.loads((folder / BUNDLE_FILE).read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise ModelLoadError(f"{folder / BUNDLE_FILE}: format must be '{BUNDLE_FORMAT}'; "
                             f"got {info.get('format')!r}")
    return TierBundle(info, load_file(str(folder / WEIGHTS_FILE)))


def write_bundle(bundle: TierBundle, folder: Path) -> Path:
    """``folder``/reefl-model.json and model.safetensors: the tier, loadable alone."""
    from reefl.outputs.files import write_atomically

    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / WEIGHTS_FILE, bundle.state)
    (folder / BUNDLE_FILE).write_text(json.dumps(bundle.info, indent=2) + "\n")
    return folder


class PredictError(ValueError):
    """A bad input or option of ``reefl predict`` (one line)."""


def input_files(paths: list[Path], kind: str) -> list[Path]:
    """The image (or audio) files among ``paths``, folders searched recursively, sorted."""
    from reefl.data.folder import AUDIO_SUFFIXES, IMAGE_SUFFIXES

    suffixes = IMAGE_SUFFIXES if kind == "image" else AUDIO_SUFFIXES
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"input {path} does not exist")
    if not files:
        raise PredictError(f"no {kind} files ({', '.join(sorted(suffixes))}) in "
                           f"{', '.join(map(str, paths))}")
    return files


def decode_files(model: AnytimeModel, files: list[Path]) -> torch.Tensor:
    """Stored examples from image or audio files, decoded as training decoded the run's
    data: uint8 images [N, C, H, W] (one size: the files' own if they share it, else the
    model's) or log-mel features."""
    from reefl.data import DataError
    from reefl.data.decode import decode_audio, decode_images

    names = [str(f) for f in files]
    try:
        stored = (decode_images(files, names, model.pipeline.size)
                  if model.pipeline.kind == "image" else decode_audio(files, names))
    except DataError as err:
        raise PredictError(str(err)) from None
    return torch.from_numpy(stored)
