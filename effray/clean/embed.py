"""The near-duplicate embedding, computed by Ray Data over an actor pool holding the model.

An image is embedded as :data:`ZOOMS` *views* (0-3 px cut from every side, resized back to
full size). Each view is the concatenation of two L2-normalised parts: the classifier's
penultimate features of the view plus those of its mirror image (flip-symmetric), centred
by the dataset's mean; and the view's 8x8 area-averaged pixels, flip-symmetrised and
standardised per image (brightness and contrast drop out). Two images' similarity
(:func:`effray.clean.knn.pair_similarity`) is the best cosine between one's view and the
other's original: the zoom that best aligns a crop with its source.

Why all of it: scored against light copies (a few pixels cropped, mirrored, JPEG-compressed,
or all three) and each image's nearest other real image, the penultimate features of one
view miss most crops; flip symmetry with centring and the zoom views each close part of
that gap, the pixel part another, and the two parts over the zoom views separate copies
from distinct images best. Averaging features over views, or centring alone, did not
separate crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray.data.images import normalize_tensor
from effray.models.predict import last_linear  # the penultimate features are its input
from effray.train.checkpoint import FORMATS

ZOOMS = (0, 1, 2, 3)  # px cut from every side of a view (0 = the image itself)
PIXEL_GRID = 8


def zoom_views(x: torch.Tensor, zooms: tuple[int, ...] = ZOOMS) -> list[torch.Tensor]:
    """Float NCHW images -> one tensor per zoom: ``c`` px cut from every side, resized back
    (bilinear, antialiased); on ``x``'s device."""
    h, w = x.shape[2:]
    out = []
    for c in zooms:
        if c == 0:
            out.append(x)
        else:
            out.append(
                F.interpolate(
                    x[:, :, c : h - c, c : w - c], size=(h, w), mode="bilinear", align_corners=False, antialias=True
                )
            )
    return out


def pixel_descriptor(x: torch.Tensor, grid: int = PIXEL_GRID) -> torch.Tensor:
    """Float NCHW images in [0, 1] -> ``grid x grid`` area averages, mirror-symmetrised,
    standardised per image and L2-normalised."""
    p = F.adaptive_avg_pool2d(x, grid)
    v = (p + p.flip(3)).flatten(1)
    v = (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-6)
    return F.normalize(v, dim=1)


class Embedder:
    """The ``map_batches`` callable: holds the model on its device (a GPU when the actor
    has one). Per batch, one host -> device copy of the uint8 images, all views, features
    and probabilities computed there, and one device -> host copy of the result:
    ``views`` (n, V, d_model + d_pixels) float32 (the model part not yet centred) and
    ``probs`` (n, C), the model's softmax on the image itself."""

    def __init__(self, payload: dict[str, Any], mean: list[float], std: list[float]) -> None:

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = FORMATS.get(payload["format"])(payload).to(self.device).eval()
        self.mean, self.std = mean, std
        self.grabbed: list[torch.Tensor] = []
        last_linear(self.model).register_forward_hook(lambda m, inp, out: self.grabbed.append(inp[0].flatten(1)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        out, probs = device_embedding(self.model, self.grabbed, images, self.mean, self.std)
        n, v, d = out.shape
        flat = torch.cat([out.flatten(1), probs], 1).cpu().numpy()  # the one device -> host copy
        keep = {k: batch[k] for k in ("origin", "index", "label") if k in batch}
        return {**keep, "views": flat[:, : v * d].reshape(n, v, d), "probs": flat[:, v * d :]}


def device_embedding(
    model: torch.nn.Module, grabbed: list[torch.Tensor], images: torch.Tensor, mean: list[float], std: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC ``images`` on the model's device -> ``views`` (n, V, f + p) and ``probs``
    (n, C), float32 on that device: every zoom view and its mirror in one forward, the
    penultimate features (``grabbed`` by the hook on the last linear layer) summed over each
    mirror pair, beside the views' pixel descriptors. No host read."""

    x = images.permute(0, 3, 1, 2).float()
    n = len(x)
    with torch.no_grad():
        views = zoom_views(x / 255.0)
        both = torch.cat([torch.cat([v, v.flip(3)]) for v in views])  # all views and mirrors: one forward
        grabbed.clear()
        # the pipeline's normalisation; it takes NHWC pixel values, and a view of these is free
        logits = model(normalize_tensor((both * 255.0).permute(0, 2, 3, 1), mean, std))
        feats = grabbed[0].float().view(len(views), 2, n, -1).sum(1)  # (V, n, f): view + its mirror
        probs = torch.softmax(logits[:n].float(), 1)
        pixels = torch.stack([pixel_descriptor(v) for v in views])
        return torch.cat([feats, pixels], 2).transpose(0, 1), probs  # (n, V, f + p), (n, C)


def finish(views: np.ndarray, feature_dim: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Centre the model part by its mean over ``rows`` (the dataset's originals; default
    all) and L2-normalise each part and each view: the embedding the kNN compares."""
    feats, pixels = views[..., :feature_dim], views[..., feature_dim:]
    mu = feats[:, 0].mean(0) if rows is None else feats[rows, 0].mean(0)
    f = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(feats - mu)), dim=2)
    p = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(pixels)), dim=2)
    return (torch.cat([f, p], 2) / np.sqrt(2.0)).numpy().astype(np.float32)
