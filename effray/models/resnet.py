"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56 (6n+2 layers) and the CIFAR ResNet-18.

Shortcuts use option B (1x1 conv + BN projection) wherever the shape changes, not the
paper's zero-padding option A: structured pruning needs a real module on every path
so that removing a channel on the residual stream has something to remove it from.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from effray.models.base import MODELS, Head, conv_bn, scaled


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; ReLU after the sum.

    Each ReLU is its own (not in-place) module: the block input is reused by the
    shortcut, and separate modules keep hooks, fusion and quantization observers simple.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_ch, out_ch, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(out_ch, out_ch, 3, 1)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def resnet(stages: list[tuple[int, int]], num_classes: int, in_channels: int, width: float) -> nn.Sequential:
    """A flat ResNet: 3x3 stem, then ``(channels, blocks)`` stages, then the head.

    The first stage keeps the resolution, each later one halves it. Every block is a
    top-level child (``s1b0``, ``s1b1``, ...) so pipeline stages can cut between any two.
    """
    channels = [scaled(c, width) for c, _ in stages]
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(*conv_bn(in_channels, channels[0]), nn.ReLU()))
    in_ch = channels[0]
    for s, ((_, blocks), out_ch) in enumerate(zip(stages, channels, strict=True), start=1):
        for b in range(blocks):
            stride = 2 if s > 1 and b == 0 else 1
            layers[f"s{s}b{b}"] = BasicBlock(in_ch, out_ch, stride)
            in_ch = out_ch
    layers["head"] = Head(in_ch, num_classes)
    return nn.Sequential(layers)


def _register_cifar_resnet(depth: int) -> None:
    n = (depth - 2) // 6

    @MODELS.register(f"resnet{depth}")
    def build(num_classes: int, in_channels: int, width: float) -> nn.Sequential:
        return resnet([(16, n), (32, n), (64, n)], num_classes, in_channels, width)

    build.__doc__ = f"ResNet-{depth} for CIFAR: 3 stages of {n} BasicBlocks, 16/32/64 channels."


for _depth in (20, 32, 56):
    _register_cifar_resnet(_depth)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, width: float) -> nn.Sequential:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 4 stages of 2 blocks, 64..512 channels."""
    return resnet([(64, 2), (128, 2), (256, 2), (512, 2)], num_classes, in_channels, width)
