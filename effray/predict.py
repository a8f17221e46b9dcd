"""A model's logits on raw images, as training scored them: normalisation, the
checkpoint's numerics (bf16 autocast, channels-last) and test-time augmentation. Below
both ``effray evaluate`` and the robustness scores, so neither imports the other."""

from __future__ import annotations

from typing import Any

import numpy as np


def tta_logits(predict: Any, images: Any, level: int) -> Any:
    """airbench's test-time augmentation over a normalised NCHW batch: level 1 averages the
    image and its mirror; level 2 gives that half the weight and the mirrored pair shifted one
    pixel up-left and down-right (reflect-padded) the other half."""
    import torch.nn.functional as F

    def mirrored(x: Any) -> Any:
        return 0.5 * predict(x) + 0.5 * predict(x.flip(-1))

    if level <= 0:
        return predict(images)
    logits = mirrored(images)
    if level >= 2:
        h, w = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * mirrored(padded[..., :h, :w]) + 0.5 * mirrored(padded[..., 2:, 2:])
        logits = 0.5 * logits + 0.5 * shifted
    return logits


def predict_logits(
    model: Any,
    images: np.ndarray,
    mean: list[float],
    std: list[float],
    tta: int = 0,
    numerics: dict[str, bool] | None = None,
) -> Any:
    """The logits of uint8 NHWC ``images``, normalised as training normalised its
    validation batches and computed with the checkpoint's ``numerics`` (call under no_grad)."""
    import torch

    from effray.data.pipeline import normalize_tensor
    from effray.train.strategy import logits as model_logits

    numerics = numerics or {}
    pixels = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # Ray's arrays are read-only
    x = normalize_tensor(pixels, mean, std, bool(numerics.get("channels_last")))
    return tta_logits(lambda v: model_logits(model, v, v.device, numerics), x, tta)
