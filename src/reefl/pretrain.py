"""``reefl pretrain``: train the backbone centrally on one data set and write it as a
DeiT-format checkpoint, for a federated run to start from (``pretrained="PATH"``).

What a server that holds public data can do before federating: train the ViT on that data
set's whole training split (no partition, no clients), then hand it to every client as the
frozen or fine-tuned backbone. Choices made:

* **Never the run's test set.** A source without a test split (the embedded digits, a
  folder) has its test examples carved from the training split by ``reefl run``; those
  (global and local tests, as a run with the same data options and seed makes them) are
  left out of pretraining (``run_test_indices``), or pretraining refuses when the partition
  cannot be made.

* **The same input as the run.** Batches go through ``input_pipeline`` exactly as in a run
  with ``pretrained`` set (3 channels, grey repeated; images normalised with ImageNet's
  mean/std, audio with its own statistics), so the features the backbone learns are the ones
  it will be fed later.
* **The same backbone.** ``VisionTransformer`` from the run-config keys (``model``,
  ``embed-dim``, ``depth``, ``num-heads``, ``patch-size``, ``mlp-ratio``, ``img-size``), plus
  DeiT's final LayerNorm and a Linear head on the class token; AdamW with a per-step cosine
  from ``lr-max`` to ``lr-min``, gradients clipped by ``clip-value``. A ``pretrained``
  checkpoint, if set, is the starting point (continued pretraining).
* **DeiT's names.** The checkpoint holds timm/DeiT names (q, k and v fused into
  ``attn.qkv``, rows q then k then v; ``norm.*``, ``head.*``), so ``read_checkpoint`` +
  ``to_backbone_names`` read it back, as they read facebookresearch/deit's files; any other
  backbone tensor (e.g. LayerScale's ``ls1.gamma``) keeps its name.
* **Nothing half-written.** The output path is checked before training; the checkpoint and
  a JSON of what produced it are written to temporary files in the target folder and renamed
  into place only when both are complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reefl.config import RunConfig
from reefl.data import DataError, DataSpec, FederatedData, Split, load_source
from reefl.data.federated import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _stats,
    build_federated_data,
    input_pipeline,
    sample_indices,
    tested_train_indices,
)
from reefl.data.loaders import client_loader, test_loader
from reefl.data.summary import dataset_slug
from reefl.models.checkpoints import load_backbone
from reefl.models.vit import VisionTransformer, trunc_normal_
from reefl.outputs.files import atomic_write
from reefl.training import autocast, cosine_lr, precision_line

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")
# the run-config keys that decide what is trained, recorded in the JSON beside the checkpoint
RECORDED_KEYS = ("dataset", "image-column", "audio-column", "label-column", "speech-classes",
                 "img-size", "model", "embed-dim", "depth", "num-heads", "patch-size",
                 "mlp-ratio", "pretrained", "seed", "batch-size", "lr-max", "lr-min",
                 "weight-decay", "clip-value", "augment", "mixed-precision")


class PretrainError(ValueError):
    """A bad option of ``reefl pretrain`` (epochs, output path...); the message is one line,
    ``exit_code`` what the command returns."""

    exit_code = 2


class OutputError(PretrainError):
    """Training finished but the checkpoint or its JSON could not be written."""

    exit_code = 1


@dataclass(frozen=True)
class EpochResult:
    """One epoch: mean training loss, test accuracy (percent) and loss if the source has a
    test split (else None), the learning rate at the end, and the epoch's wall seconds."""

    epoch: int
    train_loss: float
    test_accuracy: float | None
    test_loss: float | None
    lr: float
    seconds: float


@dataclass
class PretrainResult:
    """What ``pretrain`` wrote and measured."""

    checkpoint: Path
    info_path: Path
    history: list[EpochResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


class Classifier(nn.Module):
    """The backbone with DeiT's final LayerNorm and a Linear head on the class token: the
    model that is pretrained, named as in a DeiT checkpoint (``norm``, ``head``)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        trunc_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.embed(x)
        for block in self.backbone.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


# -- options -------------------------------------------------------------------------------


def default_output(cfg: RunConfig) -> Path:
    """``<output-dir>/pretrain-<dataset>-<model>.safetensors`` (a path's last component
    stands for the data set, with anything but letters, digits, - and _ replaced by -)."""
    return Path(cfg.output_dir) / f"pretrain-{dataset_slug(cfg.dataset)}-{cfg.model}.safetensors"


def info_path(checkpoint: Path) -> Path:
    """The JSON written beside ``checkpoint``: the same name with ``.json``."""
    return checkpoint.with_suffix(".json")


def check_options(output: Path, epochs: int, max_examples: int | None,
                  threads: int | None = None) -> Path:
    """``output`` made absolute once the options are known to be usable, before any work:
    at least one epoch, a positive ``max_examples`` and ``threads``, a checkpoint suffix, and
    a path that is not a folder and whose nearest existing ancestor is a folder this process
    may write in (the missing ones are created only when the checkpoint is written)."""
    if epochs < 1:
        raise PretrainError(f"--epochs must be an integer >= 1; got {epochs}")
    if max_examples is not None and max_examples < 1:
        raise PretrainError(f"--max-examples must be an integer >= 1; got {max_examples}")
    if threads is not None and threads < 1:
        raise PretrainError(f"--threads must be an integer >= 1; got {threads}")
    output = output.expanduser().absolute()
    if output.is_dir():
        raise PretrainError(f"--output '{output}' is a folder; give a file name")
    if output.suffix not in CHECKPOINT_SUFFIXES:
        raise PretrainError(f"--output must end in {', '.join(CHECKPOINT_SUFFIXES)}; "
                            f"got '{output}'")
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PretrainError(f"--output '{output}' cannot be written: '{ancestor}' is not a "
                            "folder this process may write in")
    return output


# -- data ----------------------------------------------------------------------------------


def _subset(length: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices 0..length-1, or a seeded random ``limit`` of them (sorted)."""
    return sample_indices(np.arange(length), limit or 0, [seed, 7])


def run_test_indices(cfg: RunConfig, spec: DataSpec) -> np.ndarray:
    """The examples of ``spec``'s training split that ``reefl run`` with ``cfg``'s data
    options (same seed, test-fraction, test-examples, num-clients, partitioner...) tests
    on, which pretraining must not train on; none when the source has a test split (the run
    tests on that). Found by partitioning exactly as the run does; a partition that cannot
    be made is a PretrainError saying why, rather than a guess."""
    if spec.test is not None:
        return np.zeros(0, np.int64)
    try:
        run = build_federated_data(cfg.data_options)
    except DataError as err:
        raise PretrainError(f"cannot tell which examples 'reefl run' with these data options "
                            f"tests on ({err}), so pretraining would risk training on them; "
                            "fix the data options first") from None
    return tested_train_indices(run)


def central_data(spec: DataSpec, seed: int, max_examples: int | None = None,
                 exclude: np.ndarray | None = None) -> FederatedData:
    """The source as one "client" holding its whole training split but ``exclude`` (the
    run's test examples, ``run_test_indices``), or a seeded ``max_examples`` of it, and its
    test split (as many at most) as the test set; no test split gives an empty test set. In
    this form the project's ``input_pipeline`` and loaders apply unchanged. Images get
    ImageNet's statistics, as ``input_pipeline`` uses for a pretrained run anyway; audio
    those of the training examples."""
    if exclude is None or len(exclude) == 0:
        train = _subset(len(spec.train), max_examples, seed)
    else:
        pool = np.setdiff1d(np.arange(len(spec.train)), exclude)
        train = sample_indices(pool, max_examples or 0, [seed, 7])
    test: Split = spec.test if spec.test is not None else spec.train
    test_idx = (_subset(len(spec.test), max_examples, seed) if spec.test is not None
                else np.arange(0))
    if spec.kind == "image":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = _stats(spec, train)
    return FederatedData(spec, test, test_idx, [train], test, [test_idx], tuple(mean),
                         tuple(std), "central")


# -- model and training --------------------------------------------------------------------


def build_classifier(cfg: RunConfig, num_classes: int, in_chans: int) -> Classifier:
    """The run's backbone (``cfg.backbone``, full depth) + norm + head, initialised from
    ``seed`` (the global RNG is left as it was), then from ``pretrained`` if it is set."""
    bb = cfg.backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = VisionTransformer(img_size=cfg.img_size, patch_size=bb["patch_size"],
                                     in_chans=in_chans, embed_dim=bb["embed_dim"],
                                     depth=bb["depth"], num_heads=bb["num_heads"],
                                     mlp_ratio=bb["mlp_ratio"], layer_scale=bb["layer_scale"])
        model = Classifier(backbone, num_classes)
    if cfg.pretrained:
        load_backbone(model.backbone, cfg.pretrained, cfg.model)
    return model


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                schedule: Callable[[int], float], first_step: int, cfg: RunConfig,
                device: torch.device) -> tuple[float, int]:
    """One pass over ``loader``, the learning rate set by ``schedule(step)`` before every
    step; returns the mean loss and the number of steps taken."""
    model.train()
    total, steps = 0.0, 0
    for images, labels in loader:
        for group in optimizer.param_groups:
            group["lr"] = schedule(first_step + steps)
        images, labels = images.to(device), labels.to(device)
        with autocast(cfg, device):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_value > 0:
            nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / max(steps, 1), steps


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, cfg: RunConfig,
             device: torch.device) -> tuple[float, float]:
    """Accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    model.eval()
    correct, loss_sum, seen = 0, 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(cfg, device):
            logits = model(images).float()
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += labels.numel()
    return 100.0 * correct / max(seen, 1), loss_sum / max(seen, 1)


# -- the checkpoint ------------------------------------------------------------------------


def to_deit_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``VisionTransformer`` state dict under timm/DeiT names: every block's ``attn.q``,
    ``attn.k`` and ``attn.v`` fused into ``attn.qkv`` (rows q, then k, then v: the inverse of
    ``to_backbone_names``); every other tensor (LayerScale's ``ls1.gamma`` too) unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attn.k." in key or ".attn.v." in key:
            continue  # fused with q, below
        if ".attn.q." in key:
            parts = [state[key.replace(".attn.q.", f".attn.{name}.")] for name in "qkv"]
            out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts, dim=0)
        else:
            out[key] = value
    return out


def checkpoint_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The trained classifier as a DeiT checkpoint: the backbone (fused qkv) plus ``norm.*``
    and ``head.*``, as contiguous float32 CPU copies."""
    state = to_deit_names(model.backbone.state_dict())
    state |= {f"norm.{k}": v for k, v in model.norm.state_dict().items()}
    state |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def write_outputs(state: dict[str, torch.Tensor], info: dict[str, Any], path: Path) -> None:
    """The checkpoint at ``path`` (safetensors, or a torch pickle ``{"model": state}`` as
    facebookresearch/deit writes for ``.pth``/``.pt``) and ``info`` as JSON beside it
    (``info_path``). Both are written to temporary files first and renamed into place only
    when both are complete; on failure the temporary files are removed."""
    import safetensors.torch

    with atomic_write(path) as weights, atomic_write(info_path(path)) as described:
        if path.suffix == ".safetensors":
            safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
        else:
            torch.save({"model": state}, weights)
        described.write_text(json.dumps(info, indent=2) + "\n")


def run_config_hint(cfg: RunConfig, path: Path) -> str:
    """The ``--run-config`` that starts a federated run from the checkpoint at ``path``:
    ``pretrained`` and the backbone's shape keys."""
    bb = cfg.backbone
    if cfg.model != "custom":
        shape = f'model="{cfg.model}"'
    else:
        shape = (f"embed-dim={bb['embed_dim']} depth={bb['depth']} num-heads={bb['num_heads']} "
                 f"patch-size={bb['patch_size']} mlp-ratio={bb['mlp_ratio']}")
    return f'pretrained="{path}" {shape} img-size={cfg.img_size}'


# -- the command ---------------------------------------------------------------------------


def _format_epoch(result: EpochResult, epochs: int) -> str:
    """One progress line, e.g. ``epoch 1/3  train loss 0.6123  test accuracy 78.20 %``."""
    line = f"epoch {result.epoch}/{epochs}  train loss {result.train_loss:.4f}"
    if result.test_accuracy is not None:
        line += f"  test accuracy {result.test_accuracy:.2f} %  test loss {result.test_loss:.4f}"
    return line + f"  lr {result.lr:.2e}  {result.seconds:.1f} s"


def pretrain(cfg: RunConfig, epochs: int, output: Path | None = None,
             max_examples: int | None = None, threads: int | None = None,
             log: Callable[[str], None] = print) -> PretrainResult:
    """Train ``cfg``'s backbone (+ norm + head) on the training split of ``cfg``'s data set,
    less the examples a run with ``cfg``'s data options tests on, for ``epochs`` epochs and
    write it as a DeiT checkpoint at ``output`` (default ``default_output``) with a JSON
    beside it; one ``log`` line per epoch. ``threads``: torch's CPU threads (default:
    torch's own).

    Raises PretrainError (bad options, checked first; OutputError if writing fails),
    DataError (the data) and CheckpointError (a ``pretrained`` start that does not fit)."""
    output = check_options(output or default_output(cfg), epochs, max_examples, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    spec = load_source(cfg.data_options.source)
    held_out = run_test_indices(cfg, spec)
    data = central_data(spec, cfg.seed, max_examples, exclude=held_out)
    pipeline = input_pipeline(data, cfg.img_size, pretrained=True, augment=cfg.augment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(cfg, spec.num_classes, pipeline.channels).to(device)
    train_batches = client_loader(data, pipeline, 0, cfg.batch_size, cfg.seed)
    test_batches = test_loader(data, pipeline, cfg.eval_batch_size)
    total_steps = epochs * len(train_batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_max,
                                  weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        return cosine_lr(step, total_steps, cfg.lr_max, cfg.lr_min)

    n_params = sum(p.numel() for p in model.backbone.parameters())
    log(f"pretraining the {cfg.model} backbone ({len(model.backbone.blocks)} blocks, "
        f"width {model.backbone.embed_dim}, {n_params:,} parameters, {pipeline.channels} "
        f"input channels) on {spec.name}: {len(data.client_indices[0])} training examples, "
        f"{len(data.test_indices) or 'no'} test examples"
        + (f" ({len(held_out)} left out: the test examples of 'reefl run' on this data)"
           if len(held_out) else "") + f", {spec.num_classes} classes, "
        f"{len(train_batches)} steps per epoch, {device.type}; {precision_line(cfg, device)}")
    history: list[EpochResult] = []
    step = 0
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        loss, steps = train_epoch(model, train_batches, optimizer, schedule, step, cfg, device)
        step += steps
        accuracy = test_loss = None
        if len(data.test_indices):
            accuracy, test_loss = evaluate(model, test_batches, cfg, device)
        history.append(EpochResult(epoch, loss, accuracy, test_loss, schedule(step - 1),
                                   time.perf_counter() - epoch_started))
        log(_format_epoch(history[-1], epochs))
    result = PretrainResult(output, info_path(output), history,
                            time.perf_counter() - started, time.process_time() - cpu_started)
    flat = cfg.to_flat()
    info = {
        "format": "deit",
        "checkpoint": output.name,
        "source": spec.name,
        "kind": spec.kind,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "in_chans": pipeline.channels,
        "normalization": {"mean": list(pipeline.mean), "std": list(pipeline.std)},
        "config": {key: flat[key] for key in RECORDED_KEYS},
        "optimizer": "adamw",
        "epochs": epochs,
        "max_examples": max_examples,
        "train_examples": len(data.client_indices[0]),
        "test_examples": len(data.test_indices),
        "run_test_examples_left_out": len(held_out),
        "steps": step,
        "history": [dataclasses.asdict(r) for r in history],
        "final_test_accuracy": history[-1].test_accuracy,
        "wall_seconds": result.wall_seconds,
        "cpu_seconds": result.cpu_seconds,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "run_config": run_config_hint(cfg, output),
    }
    try:
        write_outputs(checkpoint_state(model), info, output)
    except OSError as err:
        raise OutputError(f"cannot write '{output}': {err.strerror or err}") from None
    log(f"checkpoint: {output}\ninfo: {result.info_path}\n"
        f"start a run from it: reefl run -c '{run_config_hint(cfg, output)}'")
    return result
