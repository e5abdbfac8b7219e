"""Global-model evaluation: accuracy and loss of every exit, their mean, and the ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reefl.config import RunConfig
from reefl.training import autocast


@torch.no_grad()
def evaluate_exits(model: nn.Module, loader: DataLoader, cfg: RunConfig,
                   device: torch.device) -> dict[str, object]:
    """One pass of the full model over ``loader``; accuracies are in percent.

    The ensemble predicts the argmax of the mean of all exits' logits.
    """
    model.to(device).eval()
    correct: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    ensemble_correct, seen = 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(cfg, device):
            logits = torch.stack([z.float() for z in model(images)])  # [K, B, C]
        batch_correct = (logits.argmax(-1) == labels).sum(dim=1).double()
        batch_loss = torch.stack([F.cross_entropy(z, labels, reduction="sum") for z in logits])
        correct = batch_correct if correct is None else correct + batch_correct
        loss_sum = batch_loss.double() if loss_sum is None else loss_sum + batch_loss.double()
        ensemble_correct += (logits.mean(0).argmax(-1) == labels).sum().item()
        seen += labels.numel()
    exit_accuracy = (100.0 * correct / seen).tolist()
    return {
        "exit_accuracy": exit_accuracy,
        "exit_loss": (loss_sum / seen).tolist(),
        "mean_accuracy": sum(exit_accuracy) / len(exit_accuracy),
        "ensemble_accuracy": 100.0 * ensemble_correct / seen,
        "num_test_examples": seen,
    }
