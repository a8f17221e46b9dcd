"""The seed project's small ConvNet, made shape-correct: a baseline and a test model."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from effray.models.base import MODELS, conv_bn, scaled


@MODELS.register("convnet")
def convnet(num_classes: int, in_channels: int, width: float) -> nn.Sequential:
    """Two conv-BN-ReLU-maxpool blocks (32, 64 ch) and a two-layer MLP head (128 hidden).

    The seed hard-coded a ``view`` size that broke on 32x32 input; here the head pools
    to a fixed 8x8 grid (the identity for 32x32 input) and flattens, so the first
    linear's ``in_features`` is ``channels * 64`` for any input size and pruning the
    last conv's channels only needs that linear rebuilt.
    """
    c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(128, width)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(*conv_bn(in_channels, c1), nn.ReLU(), nn.MaxPool2d(2)),
            block1=nn.Sequential(*conv_bn(c1, c2), nn.ReLU(), nn.MaxPool2d(2)),
            head=nn.Sequential(
                OrderedDict(
                    pool=nn.AdaptiveAvgPool2d(8),
                    flatten=nn.Flatten(),
                    fc1=nn.Linear(c2 * 8 * 8, hidden, bias=False),
                    bn=nn.BatchNorm1d(hidden),
                    relu=nn.ReLU(),
                    fc=nn.Linear(hidden, num_classes),
                )
            ),
        )
    )
