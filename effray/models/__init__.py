"""Model builders by name, ``build_model("resnet20", num_classes=10)``, and by reference,
``build_model("torchvision:resnet18", 10)`` (:mod:`effray.models.reference`).

Every built-in model is an ``nn.Sequential`` of top-level blocks (stem, blocks, head) whose
forward is plain sequential application, so ``model[i:j]`` is a valid pipeline stage; all
shapes live in module parameters, so structured pruning can rebuild layers. A referenced
model is whatever its library or factory returns. Either way ``model.spec`` rebuilds the
architecture via ``build_model(**spec)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from effray.errors import EffrayError
from effray.models import airbench, convnet, fastnet, resnet  # noqa: F401  (registers builders)
from effray.models.base import MODELS, Head, init_weights
from effray.models.reference import build_reference, check_reference, is_reference, reference_from_spec, reference_spec

__all__ = ["MODELS", "Head", "build_model", "check_model_name", "count_parameters", "model_names"]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    kwargs: dict[str, Any] | None = None,
    library: str = "",
    version: str = "",
) -> nn.Module:
    """Build and initialise a registered model, or the model a reference names (``kwargs``,
    ``library`` and ``version``: what a checkpoint recorded of it); deterministic under
    ``torch.manual_seed``.

    The returned module carries ``spec`` (a plain dict of these arguments) so a checkpoint
    can rebuild the same architecture before loading weights.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EffrayError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise EffrayError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise EffrayError(f"width must be a positive number, got {width!r}")
    if is_reference(name):
        if float(width) != 1.0:
            raise EffrayError(
                f"--width applies to effray's built-in models; give {name} its size through its arguments "
                "(e.g. timm:vit_tiny_patch16_224?embed_dim=96)"
            )
        spec = reference_spec(name, num_classes, in_channels)
        spec["kwargs"] = {**spec["kwargs"], **dict(kwargs or {})}
        model = build_reference(
            reference_from_spec({**spec, "version": version or spec["version"]}), num_classes, in_channels
        )
        model.spec = spec
        return model
    builder = MODELS.get(name)
    model = builder(num_classes, in_channels, float(width))
    init_weights(model)
    model.spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "width": float(width),
    }
    return model


def check_model_name(name: str, flag: str = "--model") -> None:
    """A built-in name or a well-formed reference its library knows; anything else is one
    line listing the built-in names and the reference forms (no user code is imported)."""
    if is_reference(name):
        check_reference(name)
    elif name not in MODELS:
        raise EffrayError(
            f"unknown {flag} {name!r}; valid: {', '.join(model_names())}, or torchvision:NAME, timm:NAME, "
            "pkg.module:factory"
        )


def model_names() -> list[str]:
    """Registered model names, sorted (for CLI choices and error messages)."""
    return MODELS.names()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; the size axis of the accuracy/size Pareto front."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
