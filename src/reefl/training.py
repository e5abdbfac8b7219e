"""One client's local training: a fresh optimiser each round, the method's loss (plus its
optional penalty), clipping; and the held-out CE a method may ask for."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import cache

import torch
from torch import nn
from torch.utils.data import DataLoader

from reefl.config import RunConfig
from reefl.methods import Method
from reefl.methods.base import HeldOutCE
from reefl.methods.losses import exit_cross_entropies


def cosine_lr(step: int, total: int, lr_max: float, lr_min: float) -> float:
    """Cosine from ``lr_max`` (step 0) to a floor of ``lr_min`` over ``total`` steps, no
    warm-up: max(lr_min, lr_max/2 · (1 + cos(π·step/total)))."""
    return max(lr_min, 0.5 * lr_max * (1 + math.cos(math.pi * step / max(total, 1))))


def server_learning_rate(server_round: int, cfg: RunConfig) -> float:
    """The round's lr (docs/method.md §3): ``cosine_lr`` over the run's rounds."""
    return cosine_lr(server_round, cfg.num_server_rounds, cfg.lr_max, cfg.lr_min)


BF16_MIN_EMBED_DIM = 192  # DeiT-Tiny and wider: matmuls large enough for bf16 to pay


@cache
def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that says so, or a CPU with
    AVX-512 BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolved_precision(cfg: RunConfig, device: torch.device) -> str:
    """``mixed-precision`` with ``auto`` decided: ``bf16`` for a backbone at least
    ``BF16_MIN_EMBED_DIM`` wide on a device with native bf16, else ``fp32``. The embedded
    default (width 64) stays fp32: there bf16 autocast costs more than it saves
    (``benchmarks/train_step.py``)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    wide = cfg.backbone["embed_dim"] >= BF16_MIN_EMBED_DIM
    return "bf16" if wide and bf16_supported(device) else "fp32"


def precision_line(cfg: RunConfig, device: torch.device) -> str:
    """What training and evaluation compute in, and why, for the start of a run's log."""
    chosen = resolved_precision(cfg, device)
    why = (f"backbone width {cfg.backbone['embed_dim']}, native bf16 on {device.type}: "
           f"{'yes' if bf16_supported(device) else 'no'}")
    return f"precision {chosen} (mixed-precision={cfg.mixed_precision}; {why})"


def autocast(cfg: RunConfig, device: torch.device) -> AbstractContextManager:
    """bf16 autocast when the resolved precision is bf16; weights and optimiser stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=resolved_precision(cfg, device) == "bf16")


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0) as in the paper, or AdamW for training from scratch. Both update all
    tensors at once (``foreach``; torch's CPU default is a loop over tensors, slow for the
    many small tensors of a ViT); the update is the same, element for element."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=cfg.weight_decay,
                           foreach=True)


def held_out_exit_ce(model: nn.Module, loader: DataLoader, cfg: RunConfig,
                     device: torch.device) -> HeldOutCE:
    """A callable giving the per-exit CE of ``model``, as it is when called, on the next batch
    of ``loader`` (cycling through it); in eval mode and without gradients, so the held-out
    data is only looked at, never trained on."""
    batches = _cycle(loader)

    def next_batch_ce() -> list[float]:
        images, labels = next(batches)
        model.eval()
        with torch.no_grad(), autocast(cfg, device):
            logits = model(images.to(device))
        model.train()
        return [ce.item() for ce in exit_cross_entropies(logits, labels.to(device))]

    return next_batch_ce


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, over and over (without keeping them all in memory)."""
    while True:
        yield from loader


def train_locally(model: nn.Module, loader: DataLoader, method: Method, cfg: RunConfig,
                  lr: float, server_round: int, device: torch.device,
                  client_state: dict[str, torch.Tensor] | None = None,
                  held_out: DataLoader | None = None,
                  exit_ids: list[int] | None = None) -> dict[str, float]:
    """Train ``model`` in place for ``local-epochs`` epochs; return mean loss and exit CEs.

    ``client_state`` is this client's state kept across rounds: the method's penalty reads
    it, and its ``finish_local`` entries are written into it (in place) after training.
    ``held_out`` is the client's held-out data, given when the method asks for a split.
    ``exit_ids`` names the per-exit CEs (``train-ce-exit{id}``): the global index of each
    exit the model returns (``Method.exit_ids``); by default their positions 0, 1, ...
    The reported ``train-loss`` is the method's loss, without the penalty;
    ``train-seconds`` the wall time of the whole local training and ``train-data-seconds``
    the part spent waiting for batches (gathering and transforming them).
    """
    model.to(device).train()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    sent = {name: p.detach().clone() for name, p in named.items()}
    client_state = {} if client_state is None else client_state
    client_state.update({k: v.to(device) for k, v in client_state.items()})
    optimizer = make_optimizer(params, cfg, lr)
    state = method.new_loss_state(
        None if held_out is None else held_out_exit_ce(model, held_out, cfg, device))
    total_loss, exit_ce_sums, steps = 0.0, None, 0
    started = time.perf_counter()
    data_seconds = 0.0
    for _ in range(cfg.local_epochs):
        batches = iter(loader)
        while True:
            fetch_started = time.perf_counter()
            batch = next(batches, None)
            data_seconds += time.perf_counter() - fetch_started
            if batch is None:
                break
            images, labels = batch[0].to(device), batch[1].to(device)
            with autocast(cfg, device):
                logits = model(images)
            loss, exit_ces = method.local_loss(logits, labels, server_round, state)
            penalty = method.local_penalty(named, sent, client_state)
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            if cfg.clip_value > 0:
                nn.utils.clip_grad_value_(params, cfg.clip_value)
            optimizer.step()
            total_loss += loss.item()
            exit_ce_sums = exit_ces if exit_ce_sums is None else [
                a + b for a, b in zip(exit_ce_sums, exit_ces, strict=True)]
            steps += 1
    client_state.update(method.finish_local(named, sent, client_state))
    metrics = {"train-loss": total_loss / max(steps, 1),
               "train-seconds": time.perf_counter() - started, "train-data-seconds": data_seconds}
    for position, value in enumerate(exit_ce_sums or []):
        metrics[f"train-ce-exit{exit_ids[position] if exit_ids else position}"] = value / steps
    return metrics
