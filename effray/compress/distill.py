"""Knowledge distillation (Hinton, Vinyals & Dean 2015): the student matches the teacher's
softened class distribution as well as the labels.

``loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)``.
The T^2 keeps the soft term's gradient on the same scale as the hard one whatever T is
(soft gradients shrink as 1/T^2), so alpha means the same thing at every temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effray.config import require
from effray.errors import EffrayError


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton KD loss (mean over the batch). ``targets`` are class indices (N,) or soft
    targets (N, C) (label smoothing, mixup); the teacher's logits are detached, so no
    gradient ever reaches the teacher."""
    require(temperature > 0, f"KD temperature must be > 0, got {temperature}")
    require(0.0 <= alpha <= 1.0, f"KD alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise EffrayError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the models predict different classes"
        )
    t = teacher_logits.detach().float()
    s = student_logits.float()
    soft = (
        F.kl_div(
            F.log_softmax(s / temperature, dim=1),
            F.log_softmax(t / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    hard = F.cross_entropy(s, targets)  # index or probability targets
    return alpha * soft + (1.0 - alpha) * hard


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits in eval mode (BN running stats untouched), without a graph."""
    if teacher.training:
        teacher.eval()
    return teacher(x)


def check_student(teacher_spec: dict, student_spec: dict) -> None:
    """A student must predict the teacher's classes from the same inputs."""
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
        if key in teacher_spec and key in student_spec and teacher_spec[key] != student_spec[key]:
            raise EffrayError(
                f"student {student_spec.get('name')} has {student_spec[key]} {what}, the teacher "
                f"{teacher_spec.get('name')} has {teacher_spec[key]}; they must match to distil"
            )


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher is a fixed target."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
