"""Pieces shared by every model builder: the registry, the classifier head, init.

Builders live in sibling modules and register themselves here; ``effray.models``
imports them all, so importing the package is enough to populate ``MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from effray.registry import Registry

# A builder takes (num_classes, in_channels, width) and returns an nn.Sequential of
# top-level blocks; build_model adds init and the spec so every builder stays short.
Builder = Callable[[int, int, float], nn.Sequential]
MODELS: Registry[Builder] = Registry("model")


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier; never below one channel."""
    return max(1, int(round(channels * width)))


def conv_bn(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    """Conv (no bias: BN follows) + BN, the unit every model is built from."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class Head(nn.Module):
    """Global pool + flatten + linear (+ constant logit scale) as one pipeline block.

    Kept as one child so a pipeline stage never ends between pool and classifier, and
    the linear's ``in_features`` is the only place the final width appears.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool: str = "avg",
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, num_classes, bias=bias)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.flatten(self.pool(x)))
        return x * self.scale if self.scale != 1.0 else x

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}" if self.scale != 1.0 else ""


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (identity filters first where a conv sets ``dirac_init``),
    unit BN, small-normal linears; draws only from torch's RNG. A layer that sets
    ``default_init`` keeps PyTorch's own (uniform, 1/sqrt(fan_in)) with zero bias.

    The small head init (std 0.01, zero bias) starts every model near uniform
    predictions, so the first loss is ~log(num_classes) whatever the depth.
    """
    for m in model.modules():
        if getattr(m, "default_init", False):  # PyTorch's own init, kept on purpose (airbench)
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "dirac_init", False):
                nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if getattr(m, "dirac_init", False):  # identity on the first in_channels filters
                nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
