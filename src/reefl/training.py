"""One client's local training: a fresh optimiser each round, the method's loss, clipping."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.utils.data import DataLoader

from reefl.config import RunConfig
from reefl.methods import Method


def server_learning_rate(server_round: int, cfg: RunConfig) -> float:
    """Cosine from lr-max to a floor of lr-min over the run, no warm-up (METHOD §3):
    lr(r) = max(lr_min, lr_max/2 · (1 + cos(π·r/R)))."""
    cosine = 0.5 * cfg.lr_max * (1 + math.cos(math.pi * server_round / cfg.num_server_rounds))
    return max(cfg.lr_min, cosine)


def autocast(cfg: RunConfig, device: torch.device) -> AbstractContextManager:
    """bf16 autocast when ``mixed-precision = "bf16"``; weights and optimiser stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=cfg.mixed_precision == "bf16")


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0) as in the paper, or AdamW for training from scratch."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=cfg.weight_decay)


def train_locally(model: nn.Module, loader: DataLoader, method: Method, cfg: RunConfig,
                  lr: float, server_round: int, device: torch.device) -> dict[str, float]:
    """Train ``model`` in place for ``local-epochs`` epochs; return mean loss and exit CEs."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, lr)
    state = method.new_loss_state()
    total_loss, exit_ce_sums, steps = 0.0, None, 0
    for _ in range(cfg.local_epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with autocast(cfg, device):
                logits = model(images)
            loss, exit_ces = method.local_loss(logits, labels, server_round, state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_value > 0:
                nn.utils.clip_grad_value_(params, cfg.clip_value)
            optimizer.step()
            total_loss += loss.item()
            exit_ce_sums = exit_ces if exit_ce_sums is None else [
                a + b for a, b in zip(exit_ce_sums, exit_ces, strict=True)]
            steps += 1
    metrics = {"train-loss": total_loss / max(steps, 1)}
    for k, value in enumerate(exit_ce_sums or []):
        metrics[f"train-ce-exit{k}"] = value / steps
    return metrics
