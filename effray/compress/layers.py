"""Layer facts both pruning and quantization need (so neither imports the other)."""

from __future__ import annotations

import torch
from torch import nn

from effray.errors import EffrayError


def classifier(model: nn.Module) -> nn.Module:
    """The output layer (the last linear): structured pruning must never remove a class."""
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EffrayError(f"{type(model).__name__} has no linear output layer; structured pruning needs one to protect")
    return linears[-1]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a parameter-free module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
