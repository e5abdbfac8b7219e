"""Loss pieces shared by the methods: CE over exits, distillation, and the KD ramp λ(r)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def kd_weight(server_round: int, kd_rounds: int) -> float:
    """λ(r) = exp(−5·(1 − min(r, R)/R)²): distillation fades in over R rounds (from DepthFL)."""
    progress = min(server_round, kd_rounds) / kd_rounds
    return math.exp(-5.0 * (1.0 - progress) ** 2)


def exit_cross_entropies(logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Mean CE of every exit (computed in fp32 so bf16 autocast does not bias the loss)."""
    return [F.cross_entropy(z.float(), labels) for z in logits]


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over the batch; the teacher
    is detached so only the student learns from it."""
    log_p_teacher = F.log_softmax(teacher.detach().float() / tau, dim=-1)
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return tau**2 * kl


def distill_from(logits: list[torch.Tensor], teacher: int, tau: float) -> torch.Tensor:
    """Σ over exits k ≠ teacher of KL(teacher ‖ k); zero with a single exit."""
    terms = [kl_to_teacher(z, logits[teacher], tau) for k, z in enumerate(logits) if k != teacher]
    return torch.stack(terms).sum() if terms else logits[0].new_zeros(())


def distill_all_pairs(logits: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Σ_k Σ_{j≠k} KL(j ‖ k): every exit learns from every other (mutual distillation)."""
    if len(logits) < 2:
        return logits[0].new_zeros(())
    return torch.stack([distill_from(logits, j, tau) for j in range(len(logits))]).sum()


def mutual_distillation(logits: list[torch.Tensor], tau: float) -> torch.Tensor:
    """All-pairs KL divided by (number of exits − 1), so each exit's KL terms are averaged
    over its teachers (DepthFL; ReeFL's ``all`` variant); zero with a single exit."""
    if len(logits) < 2:
        return logits[0].new_zeros(())
    return distill_all_pairs(logits, tau) / (len(logits) - 1)


class TeacherTracker:
    """ReeFL's dynamic teacher: an EMA of each exit's training CE; the teacher is its argmin.

    m_k ← 0.8·m_k + 0.2·CE_k, starting from 0 when a round's local training starts (make a
    new tracker each round), updated before the teacher is chosen at every step.
    """

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.averages: list[float] = []

    def update(self, losses: list[float]) -> int:
        """Fold in this step's per-exit CE; return the index of the teacher exit."""
        self.averages = self.averages or [0.0] * len(losses)
        self.averages = [self.decay * m + (1 - self.decay) * loss
                         for m, loss in zip(self.averages, losses, strict=True)]
        return min(range(len(self.averages)), key=self.averages.__getitem__)


class HeldOutTeacher:
    """ReeFL's ``dynamic`` variant: the teacher is the exit with the lowest CE on a held-out
    batch, asked for afresh at every step (``held_out`` yields the next batch's per-exit CE).
    Same ``update`` interface as ``TeacherTracker``; the training CEs are not used."""

    def __init__(self, held_out: Callable[[], list[float]]) -> None:
        self.held_out = held_out

    def update(self, losses: list[float]) -> int:
        """The exit with the lowest held-out CE (ties go to the shallower exit)."""
        ces = self.held_out()
        return min(range(len(ces)), key=ces.__getitem__)
