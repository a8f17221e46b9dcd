"""A model of the user's own, for ``--model tests.user_models:residual_dw``: not an
``nn.Sequential``, with a residual add and a depthwise conv, as a practitioner writes one.
(Importable as ``tests.user_models`` from the repository root, which Ray's local workers
get on their path from the driver's working directory.)"""

from __future__ import annotations

import torch
from torch import nn


class ResidualDW(nn.Module):
    """stem -> [depthwise 3x3 -> pointwise 1x1] + skip -> downsample -> pool -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width))
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(x + self.pw_bn(self.pw(y)))
        x = torch.relu(self.down_bn(self.down(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def residual_dw(num_classes: int = 10, width: int = 16) -> nn.Module:
    """The factory ``--model`` names; effray passes ``num_classes`` from the data."""
    return ResidualDW(num_classes, width)


def headless(width: int = 8) -> nn.Module:
    """A factory without ``num_classes``: effray sizes its last Linear to the data."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1000)
    )


def not_a_model() -> str:
    return "a string"
