"""airbench94's network (Jordan 2024), with the initialisation that makes it fast.

``fastnet`` is the same shape with a learned stem and standard init; this one adds what
the airbench ablations measured to roughly halve the epochs to a given accuracy:

* a frozen 2x2 **patch-whitening** stem: its filters are the eigenvectors of the training
  images' 2x2 patch covariance, scaled by 1/sqrt(eigenvalue), in +/- pairs (so GELU keeps
  both signs). It needs data, so it is set by :func:`init_from_data` before training
  (``effray train`` does it from the first training rows); until then it is identity-like
  noise and the model still runs.
* **dirac** (identity) init of every 3x3 conv's first ``in_channels`` filters: an
  implicit residual path through a net without residual connections; the other filters
  and the head keep PyTorch's default init, as in airbench.
* BatchNorm without a learned scale (only the bias trains, see ``--bias-lr-scale``) and a
  fast running-stat momentum (0.4 in PyTorch's convention).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from effray.models.base import MODELS, Head, scaled

WHITEN_KERNEL = 2
BN_MOMENTUM = 0.4  # PyTorch's convention (airbench's 0.6 = 1 - 0.4)


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)  # scale fixed at 1: the next conv's weights carry it
    return bn


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    conv.dirac_init = True  # read by effray.models.base.init_weights
    # PyTorch's default init, as airbench keeps it: ~2.5x smaller weights than Kaiming's
    # fan-out normal, which under BatchNorm means larger effective steps for the same lr
    conv.default_init = True
    return conv


def _group(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv1=_conv(in_ch, out_ch),
            pool=nn.MaxPool2d(2),
            bn1=_bn(out_ch),
            act1=nn.GELU(),
            conv2=_conv(out_ch, out_ch),
            bn2=_bn(out_ch),
            act2=nn.GELU(),
        )
    )


@MODELS.register("airbench")
def airbench(num_classes: int, in_channels: int, width: float) -> nn.Sequential:
    """Whitening stem (2 x C x 2 x 2 channels), groups of 64, 256, 256 (x width), global
    max-pool, bias-free linear scaled by 1/9. ~1.97M parameters at width 1."""
    whiten = nn.Conv2d(in_channels, 2 * in_channels * WHITEN_KERNEL**2, WHITEN_KERNEL, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    whiten.whitening = True  # init_from_data sets it
    w1, w2, w3 = (scaled(c, width) for c in (64, 256, 256))
    head = Head(w3, num_classes, pool="max", bias=False, scale=1 / 9)
    head.fc.default_init = True  # PyTorch's, as airbench: the 1/9 scale keeps the first logits small
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(whiten, nn.GELU()),
            group1=_group(whiten.out_channels, w1),
            group2=_group(w1, w2),
            group3=_group(w2, w3),
            head=head,
        )
    )


def whitening_biases(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The whitening stems' biases: airbench trains them for the first 3 epochs only
    (``--whiten-bias-epochs``), after which the stem is fixed and cheaper to step."""
    return tuple(m.bias for m in model.modules() if getattr(m, "whitening", False) and m.bias is not None)


def needs_data_init(model: nn.Module) -> bool:
    return any(getattr(m, "whitening", False) for m in model.modules())


@torch.no_grad()
def init_from_data(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set every whitening conv from ``images`` (normalised float NCHW, a few thousand):
    filters = patch-covariance eigenvectors / sqrt(eigenvalue + eps), largest first,
    then the same filters negated. Deterministic given the images."""
    for m in model.modules():
        if not getattr(m, "whitening", False):
            continue
        c, (kh, kw) = images.shape[1], m.kernel_size
        if c != m.in_channels:
            raise ValueError(f"whitening conv expects {m.in_channels} channels, images have {c}")
        patches = images.double().unfold(2, kh, 1).unfold(3, kw, 1)  # N C H' W' kh kw
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        cov = flat.T @ flat / len(flat)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0), vectors.T.flip(0)
        filters = (vectors / torch.sqrt(values.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
        m.weight.copy_(torch.cat([filters, -filters]).to(m.weight.dtype))
        if m.bias is not None:
            m.bias.zero_()
