"""A fast time-to-accuracy CIFAR net after airbench94 (Jordan 2024) and Page's ResNet-9."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from effray.models.base import MODELS, Head, conv_bn, scaled


def conv_group(in_ch: int, out_ch: int) -> nn.Sequential:
    """conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU (airbench's ConvGroup).

    Pooling right after the first conv runs the second conv at a quarter of the
    pixels, which is where most of the speed comes from.
    """
    conv1, bn1 = conv_bn(in_ch, out_ch)
    conv2, bn2 = conv_bn(out_ch, out_ch)
    return nn.Sequential(
        OrderedDict(
            conv1=conv1,
            pool=nn.MaxPool2d(2),
            bn1=bn1,
            act1=nn.GELU(),
            conv2=conv2,
            bn2=bn2,
            act2=nn.GELU(),
        )
    )


@MODELS.register("fastnet")
def fastnet(num_classes: int, in_channels: int, width: float) -> nn.Sequential:
    """airbench94's network with a learned stem: ~2M parameters, 94% on CIFAR-10 fast.

    Design (widths at ``width=1``):

    * ``stem``: 3x3 conv to 32 channels + BN + GELU. airbench uses a frozen 2x2 conv
      initialised from the data's patch-whitening basis; a learned conv keeps this
      module free of data and every path prunable, at the cost of a little accuracy.
    * ``group1..3``: three conv groups of 64, 256, 256 channels, each halving the
      resolution (32 -> 16 -> 8 -> 4). No residuals: at this depth they cost time
      and buy nothing (airbench's ablation); plain chains also prune trivially.
    * ``head``: global max-pool, linear without bias, logits scaled by 1/9. The
      scale acts as a fixed temperature that keeps early logits small so the
      high learning rates of the fast schedule stay stable (Page's ResNet-9 uses 1/8).

    The speed comes as much from the recipe as from the net: ``bench/time_to_accuracy.py``
    trains it with label smoothing 0.2, crop + flip augmentation and large-batch Nesterov
    SGD on a one-cycle schedule. airbench94 itself reaches 94% in ~10 epochs on one GPU
    with extras this net leaves out (whitening stem, dirac init, lookahead, test-time
    flips): ``airbench`` is this net with them, ``--lookahead``/``--tta`` the recipe's.
    """
    stem, w1, w2, w3 = (scaled(c, width) for c in (32, 64, 256, 256))
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(*conv_bn(in_channels, stem), nn.GELU()),
            group1=conv_group(stem, w1),
            group2=conv_group(w1, w2),
            group3=conv_group(w2, w3),
            head=Head(w3, num_classes, pool="max", bias=False, scale=1 / 9),
        )
    )
