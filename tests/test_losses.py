"""ReeFL's local objective (docs/method.md §3) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.methods.losses import TeacherTracker, kd_weight, kl_to_teacher
from reefl.training import server_learning_rate

LN3 = math.log(3.0)
# Two exits, one example, two classes, label 0:
#   exit 0 logits [0, 0]    -> p0 = [0.5, 0.5],   CE0 = ln 2          = 0.693147
#   exit 1 logits [ln 3, 0] -> p1 = [0.75, 0.25], CE1 = -ln 0.75      = 0.287682
#   KL(p1 ‖ p0) = 0.75·ln(1.5) + 0.25·ln(0.5)                        = 0.130812
#   with τ = 2: p1 = [a, 1 − a], a = √3/(√3+1) = 0.633975,
#   τ²·KL(p1 ‖ p0) = 4·(a·ln 2a + (1 − a)·ln 2(1 − a)) = 4·0.036341 = 0.145363
LOGITS = [torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])]
LABELS = torch.tensor([0])
CE0, CE1, KL_10, KL_10_TAU2 = 0.693147, 0.287682, 0.130812, 0.145363


def _method(**overrides):
    cfg = RunConfig.from_flat({"depth": 2, "num-exits": 2, "kd-rounds": 300, **overrides})
    return build_method(cfg, TaskSpec(num_classes=2, in_chans=1))


def test_kd_ramp() -> None:
    assert kd_weight(300, 300) == 1.0
    assert kd_weight(600, 300) == 1.0
    assert kd_weight(150, 300) == pytest.approx(math.exp(-1.25))  # 0.286505
    assert kd_weight(0, 300) == pytest.approx(math.exp(-5))


def test_kl_matches_hand_computation() -> None:
    assert kl_to_teacher(LOGITS[0], LOGITS[1], 1.0).item() == pytest.approx(KL_10, abs=1e-6)
    assert kl_to_teacher(LOGITS[0], LOGITS[1], 2.0).item() == pytest.approx(KL_10_TAU2, abs=1e-6)


def test_reefl_loss_is_summed_ce_plus_ramped_kl_from_best_exit() -> None:
    method = _method()
    loss, ces = method.local_loss(LOGITS, LABELS, 300, method.new_loss_state())
    assert ces == pytest.approx([CE0, CE1], abs=1e-6)
    # exit 1 has the lower CE, so it teaches exit 0; λ(300) = 1
    assert loss.item() == pytest.approx(CE0 + CE1 + KL_10, abs=1e-5)
    loss, _ = method.local_loss(LOGITS, LABELS, 150, method.new_loss_state())
    assert loss.item() == pytest.approx(CE0 + CE1 + math.exp(-1.25) * KL_10, abs=1e-5)
    loss, _ = _method(**{"kd-temperature": 2.0}).local_loss(LOGITS, LABELS, 300, TeacherTracker())
    assert loss.item() == pytest.approx(CE0 + CE1 + KL_10_TAU2, abs=1e-5)


def test_teacher_is_not_the_student_and_gets_no_gradient() -> None:
    method = _method()
    logits = [z.clone().requires_grad_() for z in LOGITS]
    loss, _ = method.local_loss(logits, LABELS, 300, method.new_loss_state())
    loss.backward()
    # exit 1 (teacher) only gets its CE gradient: p1 - onehot = [-0.25, 0.25]
    torch.testing.assert_close(logits[1].grad, torch.tensor([[-0.25, 0.25]]))


def test_shallow_exit_can_teach() -> None:
    reversed_logits = [LOGITS[1], LOGITS[0]]
    method = _method()
    loss, _ = method.local_loss(reversed_logits, LABELS, 300, method.new_loss_state())
    assert loss.item() == pytest.approx(CE0 + CE1 + KL_10, abs=1e-5)


def test_single_exit_client_has_no_distillation() -> None:
    method = _method()
    loss, _ = method.local_loss(LOGITS[:1], LABELS, 300, method.new_loss_state())
    assert loss.item() == pytest.approx(CE0, abs=1e-6)


def test_distillation_variants() -> None:
    # none: CE only; forward: deepest exit teaches (same as dynamic here);
    # all: (KL(1‖0) + KL(0‖1)) / (K − 1); KL(p0 ‖ p1) = 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25)
    kl_01 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    expected = {"none": 0.0, "forward": KL_10, "all": KL_10 + kl_01}
    for mode, kd in expected.items():
        method = _method(distillation=mode)
        loss, _ = method.local_loss(LOGITS, LABELS, 300, method.new_loss_state())
        assert loss.item() == pytest.approx(CE0 + CE1 + kd, abs=1e-5), mode


def test_teacher_follows_the_moving_average_not_the_last_step() -> None:
    tracker = TeacherTracker()
    assert tracker.update([1.0, 2.0]) == 0  # m = [0.2, 0.4]
    assert tracker.update([3.0, 0.5]) == 1  # m = [0.76, 0.42]
    assert tracker.update([0.6, 0.9]) == 1  # m = [0.728, 0.516]: exit 0 is better right now
    assert tracker.averages == pytest.approx([0.728, 0.516])
    assert TeacherTracker().update([5.0, 4.0, 6.0]) == 1  # a fresh tracker starts from 0


def test_cosine_learning_rate_schedule() -> None:
    cfg = RunConfig.from_flat({"lr-max": 0.05, "lr-min": 0.001, "num-server-rounds": 100})
    assert server_learning_rate(0, cfg) == pytest.approx(0.05)
    assert server_learning_rate(50, cfg) == pytest.approx(0.025)
    assert server_learning_rate(100, cfg) == pytest.approx(0.001)  # the floor
    assert server_learning_rate(99, cfg) == pytest.approx(0.001)  # 0.025·(1+cos(0.99π)) < floor
