"""When a sample leaves: confidence at an exit, per-exit thresholds and a compute budget.

Confidence is a number in [0, 1] for every criterion, so one rule serves all: a sample stops
at exit k when its confidence there is at least the exit's threshold. A threshold of 0 stops
every sample at once; one above 1 stops none (it goes on to the last exit). A budget (FLOPs
per image) makes the deepest exit it affords the last one taken; a budget below exit 0's cost
still takes exit 0, the least any prediction costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reefl.anytime import CRITERIA

NEVER = 2.0
"""A threshold no confidence reaches (confidences are at most 1): the sample goes on."""


def confidence(logits: torch.Tensor, criterion: str = "maxprob") -> torch.Tensor:
    """Confidence of each row of ``logits`` [..., classes], in [0, 1].

    ``maxprob``: the largest softmax probability. ``entropy``: 1 − H(p) / log(classes), so 1
    is a one-hot prediction and 0 the uniform one.
    """
    probs = logits.float().softmax(dim=-1)
    if criterion == "maxprob":
        return probs.max(dim=-1).values
    if criterion == "entropy":
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
        return (1.0 - entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got '{criterion}'")


def last_affordable_exit(exit_flops: Sequence[int], budget: float | None) -> int:
    """The deepest exit whose cost is within ``budget`` FLOPs per image (None: no budget, the
    last exit); exit 0 when even it costs more."""
    if budget is None:
        return len(exit_flops) - 1
    affordable = [k for k, flops in enumerate(exit_flops) if flops <= budget]
    return affordable[-1] if affordable else 0


@dataclass(frozen=True)
class ExitPolicy:
    """Per-exit thresholds (one per exit; the last exit's is never read), the confidence
    criterion, and the last exit a sample may reach."""

    thresholds: tuple[float, ...]
    criterion: str = "maxprob"
    last_exit: int | None = None

    @classmethod
    def build(cls, num_exits: int, thresholds: float | Sequence[float],
              criterion: str = "maxprob", exit_flops: Sequence[int] | None = None,
              budget: float | None = None) -> ExitPolicy:
        """A policy for a model with ``num_exits`` exits: one threshold for all or one per
        exit, and the budget turned into the last exit it affords (needs ``exit_flops``)."""
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; "
                             f"got '{criterion}'")
        values = ([float(thresholds)] * num_exits if isinstance(thresholds, (int, float))
                  else [float(t) for t in thresholds])
        if len(values) != num_exits:
            raise ValueError(f"thresholds must be one number or {num_exits} (one per exit); "
                             f"got {len(values)}")
        last = None
        if budget is not None:
            if exit_flops is None:
                raise ValueError("a budget needs the FLOPs of every exit")
            last = last_affordable_exit(exit_flops, budget)
        return cls(tuple(values), criterion, last)

    def stops(self, exit_index: int, logits: torch.Tensor) -> torch.Tensor:
        """Which samples stop at ``exit_index`` given its logits [B, classes]."""
        if self.last_exit is not None and exit_index >= self.last_exit:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        return confidence(logits, self.criterion) >= self.thresholds[exit_index]

    def exits_taken(self, confidences: torch.Tensor) -> torch.Tensor:
        """The exit each sample takes, from its confidence at every exit [K, N] (as if all
        exits were computed; what ``stops`` decides one exit at a time)."""
        num_exits = confidences.shape[0]
        last = num_exits - 1 if self.last_exit is None else min(self.last_exit, num_exits - 1)
        limits = torch.tensor(self.thresholds[:num_exits], dtype=confidences.dtype)
        passes = confidences >= limits[:, None]
        passes[last:] = True
        return passes.float().argmax(dim=0)
