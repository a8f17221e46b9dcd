"""Hinton KD loss: equal to a hand computation, gradient to the student only, bad input
is one line."""

from __future__ import annotations

import math

import pytest
import torch

from effray.compress.distill import check_student, freeze_teacher, kd_loss, teacher_logits
from effray.errors import EffrayError


def by_hand(s: list[list[float]], t: list[list[float]], labels: list[int], T: float, alpha: float) -> float:
    def softmax(row: list[float], temp: float) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for srow, trow, y in zip(s, t, labels):
        p, q = softmax(trow, T), softmax(srow, T)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        ce += -math.log(softmax(srow, 1.0)[y])
    n = len(s)
    return alpha * T * T * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (3.0, 1.0)])
def test_kd_loss_matches_hand_computation(T, alpha):
    s = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]
    t = [[2.0, 0.0, 1.0], [-0.4, 1.5, 0.1]]
    labels = [2, 1]
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(labels), T, alpha)
    assert got.item() == pytest.approx(by_hand(s, t, labels, T, alpha), rel=1e-5)


def test_soft_targets_equal_one_hot_labels():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    assert kd_loss(s, t, onehot, 2.0, 0.3).item() == pytest.approx(kd_loss(s, t, y, 2.0, 0.3).item(), rel=1e-6)


def test_identical_logits_leave_only_the_hard_term():
    s = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(6, 3), freeze_teacher(torch.nn.Linear(6, 3).train())
    assert not teacher.training
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    kd_loss(student(x), teacher(x), y, 4.0, 0.7).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None
    # even an unfrozen teacher gets no gradient: its logits are detached
    other = torch.nn.Linear(6, 3)
    kd_loss(student(x), other(x), y, 4.0, 0.7).backward()
    assert other.weight.grad is None
    assert not teacher_logits(other.train(), x).requires_grad and not other.training


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_bad_temperature_is_one_line(T):
    with pytest.raises(EffrayError, match="temperature must be > 0"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), T, 0.5)


def test_bad_alpha_and_mismatched_classes():
    with pytest.raises(EffrayError, match="alpha"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 2.0, 1.5)
    with pytest.raises(EffrayError, match="different classes"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), 2.0, 0.5)
    with pytest.raises(EffrayError, match="has 100 classes, the teacher resnet20 has 10") as err:
        check_student({"name": "resnet20", "num_classes": 10}, {"name": "convnet", "num_classes": 100})
    assert "\n" not in str(err.value)
