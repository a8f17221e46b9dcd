"""Feature distillation (FitNets, Romero et al. 2015): named intermediate outputs of the
student match the teacher's, beside the logit KD.

Forward hooks capture each named module's output on both models as the step's forward runs
(no second student forward). Where a pair's widths differ (a ResNet-18 block against a
ResNet-50 one, or a structurally pruned student) a learned 1x1 projection maps the
student's channels to the teacher's; equal widths compare directly, the usual case of a
student compressed from its own teacher. Spatial sizes that differ are average-pooled to
the smaller; token sequences must have the same length.

The term is a normalised MSE, ``mean((p - t)^2) / mean(t^2)`` per pair, averaged over the
pairs: it starts near 1 whatever a layer's scale, so one weight (``--kd-feature-weight``)
means the same for every pair and beside the logit loss. The projections train with the
student and are no part of it: they never reach the artifact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from effray.errors import EffrayError

EPS = 1e-6


def check_feature_names(model: nn.Module, names: list[str], which: str) -> None:
    """Every name is a module of ``model``, or one line saying which are not and where to look."""
    known = dict(model.named_modules())
    missing = [n for n in names if n not in known]
    if missing:
        sample = ", ".join(n for n in list(known)[1:8])
        raise EffrayError(
            f"--kd-features: the {which} has no module {missing[0]!r}; name modules as model.named_modules() "
            f"gives them (e.g. {sample})"
        )


def first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output as the tensor to match (the first of a tuple, as blocks return
    them); None for anything else (a tracer's proxy while BN folding traces the model)."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


class Taps:
    """The outputs of named modules of one model, captured by forward hooks as it runs.
    :meth:`attach` again after the modules were replaced (quantization swaps them)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.unique = list(dict.fromkeys(names))
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._modules: list[nn.Module] = []

    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        now = [modules[n] for n in self.unique]
        if len(now) == len(self._modules) and all(a is b for a, b in zip(now, self._modules)):
            return
        self.remove()
        for name, module in zip(self.unique, now):
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        self._modules = now

    def _keeper(self, name: str) -> Any:
        def keep(_module: nn.Module, _args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                self.outputs[name] = tensor

        return keep

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._modules = [], []

    def take(self) -> list[torch.Tensor]:
        """The captured outputs in name order, cleared (a step holds no graph past its loss)."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise EffrayError(
                f"--kd-features: module {missing[0]!r} gave no tensor in the forward; name one that returns one"
            )
        out = [self.outputs[n] for n in self.names]  # one module may be the target of several pairs
        self.outputs.clear()
        return out


def projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """What maps one student output onto the teacher's: identity at equal widths, else a
    1x1 conv (maps ``N,C,H,W``) or a linear layer (the last dim of ``N,C`` or ``N,T,C``)."""
    if student.dim() != teacher.dim() or student.dim() not in (2, 3, 4):
        raise EffrayError(
            f"--kd-features pairs outputs of shapes {tuple(student.shape)} and {tuple(teacher.shape)}; "
            "pair modules whose outputs are both N,C or N,C,H,W or N,T,C"
        )
    if student.dim() == 3 and student.shape[1] != teacher.shape[1]:
        raise EffrayError(
            f"--kd-features pairs {student.shape[1]} tokens with {teacher.shape[1]}; pair layers with as many tokens"
        )
    width_axis = 1 if student.dim() == 4 else -1
    s, t = student.shape[width_axis], teacher.shape[width_axis]
    if s == t:
        return nn.Identity()
    return nn.Conv2d(s, t, 1, bias=False) if student.dim() == 4 else nn.Linear(s, t, bias=False)


class Projector(nn.Module):
    """The student-side projections, one per pair, called once per step on all of them
    (one forward per backward: a DDP wrapper around it syncs their gradients)."""

    def __init__(self, maps: list[nn.Module]) -> None:
        super().__init__()
        self.maps = nn.ModuleList(maps)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(f) for m, f in zip(self.maps, features)]


def matched(projected: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs at the smaller spatial size (average pooling), in float."""
    p, t = projected.float(), teacher.detach().float()
    if p.dim() == 4 and p.shape[-2:] != t.shape[-2:]:
        size = (min(p.shape[-2], t.shape[-2]), min(p.shape[-1], t.shape[-1]))
        p, t = F.adaptive_avg_pool2d(p, size), F.adaptive_avg_pool2d(t, size)
    return p, t


def feature_loss(projected: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the pairs of ``mean((p - t)^2) / mean(t^2)`` (on the device, no host read)."""
    terms = []
    for p, t in zip(projected, teacher):
        p, t = matched(p, t)
        terms.append((p - t).square().mean() / (t.square().mean() + EPS))
    return torch.stack(terms).mean()


class FeatureKD:
    """Feature distillation for one fine-tune: the teacher's and the student's taps and the
    projections between them. :meth:`attach` (at the start and after every structural
    event) hooks the student's current modules and builds projections for the widths it has
    now; :meth:`loss` after a forward of both models."""

    def __init__(self, pairs: dict[str, str], teacher: nn.Module) -> None:
        check_feature_names(teacher, list(pairs.values()), "teacher")
        self.pairs = dict(pairs)
        self.student_taps, self.teacher_taps = Taps(list(pairs)), Taps(list(pairs.values()))
        self.teacher_taps.attach(teacher)
        self.teacher = teacher
        self.projector: Projector | None = None
        self.shapes: list[tuple[int, int]] = []  # the (student, teacher) widths the projections map

    @torch.no_grad()
    def attach(self, student: nn.Module, example: torch.Tensor, state: dict[str, Any] | None = None) -> bool:
        """Hook ``student`` and (re)build the projections if its widths changed, probing both
        models in eval mode on ``example`` (one image on the device); ``state``: a resumed
        run's projections. True when the projections are new (the optimizer must take them)."""
        check_feature_names(student, list(self.pairs), "student")
        self.student_taps.attach(student)
        was_training = student.training
        student.eval()
        try:
            student(example)
            self.teacher(example)
        finally:
            student.train(was_training)
        s_out, t_out = self.student_taps.take(), self.teacher_taps.take()
        shapes = [
            (s.shape[1 if s.dim() == 4 else -1], t.shape[1 if t.dim() == 4 else -1]) for s, t in zip(s_out, t_out)
        ]
        if self.projector is not None and shapes == self.shapes:
            return False
        with torch.device(example.device):  # made beside the weights, not moved there
            self.projector = Projector([projection(s, t) for s, t in zip(s_out, t_out)])
        if state is not None:
            self.projector.load_state_dict(state)
        self.shapes = shapes
        return True

    def loss(self, project: nn.Module) -> torch.Tensor:
        """The term for the forward that just ran (``project``: the projector as prepared)."""
        return feature_loss(project(self.student_taps.take()), self.teacher_taps.take())

    def detach(self) -> None:
        """Remove the hooks from both models."""
        self.student_taps.remove()
        self.teacher_taps.remove()

    def state(self) -> dict[str, torch.Tensor]:
        """The projections' weights on the CPU, for a progress checkpoint."""
        assert self.projector is not None
        return {k: v.detach().cpu() for k, v in self.projector.state_dict().items()}

    def trainable(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) if self.projector is not None else []
