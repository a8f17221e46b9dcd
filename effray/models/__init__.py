"""Model builders by name: ``build_model("resnet20", num_classes=10)``.

Every model is an ``nn.Sequential`` of top-level blocks (stem, blocks, head) whose
forward is plain sequential application, so ``model[i:j]`` is a valid pipeline
stage; all shapes live in module parameters, so structured pruning can rebuild
layers; and ``model.spec`` rebuilds the architecture via ``build_model(**spec)``.
"""

from __future__ import annotations

from torch import nn

from effray.errors import EffrayError
from effray.models import airbench, convnet, fastnet, resnet  # noqa: F401  (registers builders)
from effray.models.base import MODELS, Head, init_weights

__all__ = ["MODELS", "Head", "build_model", "count_parameters", "model_names"]


def build_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """Build and initialise a registered model; deterministic under ``torch.manual_seed``.

    The returned module carries ``spec`` (a plain dict of these four arguments) so a
    checkpoint can rebuild the same architecture before loading weights.
    """
    builder = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EffrayError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise EffrayError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise EffrayError(f"width must be a positive number, got {width!r}")
    model = builder(num_classes, in_channels, float(width))
    init_weights(model)
    model.spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "width": float(width),
    }
    return model


def model_names() -> list[str]:
    """Registered model names, sorted (for CLI choices and error messages)."""
    return MODELS.names()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; the size axis of the accuracy/size Pareto front."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
