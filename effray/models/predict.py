"""A model's logits as training scored them: the numerics (bf16 autocast, channels-last),
the normalisation of raw uint8 images, and test-time augmentation. A model concern, below
every stage, so training's validation, compression's measurement, ``effray evaluate``,
the robustness scores and deployment all run the same forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effray.data.augment import model_input
from effray.errors import EffrayError


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (norms, softmax and losses stay fp32), or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def logits(model: nn.Module, images: torch.Tensor, device: torch.device, numerics: dict[str, bool]) -> torch.Tensor:
    """fp32 logits of normalised ``images`` on ``device`` under ``numerics`` (bf16
    autocast, channels-last input): the one forward pass training and scoring share."""
    x = images.to(device, non_blocking=True)
    if numerics.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, bool(numerics.get("bf16"))):
        return model(x).float()


def tta_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, level: int) -> torch.Tensor:
    """airbench's test-time augmentation over a normalised NCHW batch: level 1 averages the
    image and its mirror; level 2 gives that half the weight and the mirrored pair shifted one
    pixel up-left and down-right (reflect-padded) the other half."""

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * predict(x) + 0.5 * predict(x.flip(-1))

    if level <= 0:
        return predict(images)
    out = mirrored(images)
    if level >= 2:
        h, w = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * mirrored(padded[..., :h, :w]) + 0.5 * mirrored(padded[..., 2:, 2:])
        out = 0.5 * out + 0.5 * shifted
    return out


def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    mean: list[float] | Any,
    std: list[float] | Any,
    tta: int = 0,
    numerics: dict[str, bool] | None = None,
    preprocess: str | None = None,
) -> torch.Tensor:
    """The logits of uint8 NHWC ``images`` (numpy or a tensor on any device), preprocessed
    (``preprocess``: the model's, for images stored at another size than it takes) and
    normalised as training did its validation batches, computed with the checkpoint's
    ``numerics`` on the model's device (call under no_grad)."""
    numerics = numerics or {}
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # Ray's arrays are read-only
    device = next((p.device for p in model.parameters()), images.device)
    channels_last = bool(numerics.get("channels_last"))
    x = model_input(images.to(device, non_blocking=True), preprocess, mean, std, channels_last)
    return tta_logits(lambda v: logits(model, v, device, numerics), x, tta)


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last ``Linear``: its input is the penultimate features that the
    near-duplicate embedding and the synthetic-data scores read."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EffrayError("the classifier has no linear layer to take penultimate features from")
    return linears[-1]
