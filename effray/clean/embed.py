"""The embedding pass's callable, run by Ray Data over an actor pool: every image's pixel
thumbnail and descriptors (:mod:`effray.clean.pixels`), and, when the pass holds a
classifier, its probabilities (the evaluation splits' label issues) and, for
``--embedder classifier``, its features.

The classifier embedding (the default before the leak probe measured it): an image is
embedded as :data:`ZOOMS` *views* (0-3 px cut from every side, resized back). Each view is
the concatenation of two L2-normalised parts: the classifier's penultimate features of
the view plus those of its mirror image (flip-symmetric), centred by the dataset's mean;
and the view's 8x8 area-averaged pixels, flip-symmetrised and standardised per image.
Two images' similarity (:func:`effray.clean.knn.pair_similarity`) is the best cosine
between one's view and the other's original. It finds light copies (a few pixels cropped,
mirrored, JPEG-compressed) but not a re-shot or re-cropped object: a classifier trained to
tell classes apart puts two photos of one car about as close as two cars.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray.clean import pixels
from effray.data.augment import preprocess
from effray.data.images import normalize_tensor
from effray.models.predict import last_linear  # the penultimate features are its input
from effray.train.checkpoint import FORMATS

ZOOMS = (0, 1, 2, 3)  # px cut from every side of a classifier view (0 = the image itself)
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
    """The ``map_batches`` callable: holds the classifier (if any) on its device (a GPU
    when the actor has one). Per batch, one host -> device copy of the uint8 images,
    everything computed there, and one device -> host copy of the result: ``thumb``
    (n, C, THUMB, THUMB) uint8, ``coarse`` (n, 2, d) and ``fine`` (n, d) (the pixel
    descriptors, :func:`device_pixels`); with a
    classifier ``probs`` (n, classes), and with ``features`` ``views`` (n, V, d) (the model
    part not yet centred)."""

    def __init__(
        self, payload: dict[str, Any] | None, mean: list[float], std: list[float], features: bool = False
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None if payload is None else FORMATS.get(payload["format"])(payload).to(self.device).eval()
        self.mean, self.std, self.features = mean, std, features and payload is not None
        # a classifier that takes another size than the rows are stored at: its own preprocessing
        self.preprocess = (payload.get("data") or {}).get("preprocess") if payload is not None else None
        self.grabbed: list[torch.Tensor] = []
        if self.model is not None:
            last_linear(self.model).register_forward_hook(lambda m, inp, out: self.grabbed.append(inp[0].flatten(1)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        parts, shapes = device_pixels(images), {}
        if self.model is not None:
            views, probs = device_embedding(self.model, self.grabbed, images, self.mean, self.std, self.preprocess)
            parts["probs"] = probs
            if self.features:
                parts["views"] = views
        n = len(images)
        flat = torch.cat([p.reshape(n, -1).float() for p in parts.values()], 1).cpu().numpy()  # one device -> host
        out, at = {k: batch[k] for k in ("origin", "index", "label") if k in batch}, 0
        for name, p in parts.items():
            shapes[name] = tuple(p.shape[1:])
            width = int(np.prod(shapes[name]))
            out[name] = flat[:, at : at + width].reshape(n, *shapes[name])
            at += width
        out["thumb"] = out["thumb"].astype(np.uint8)
        return out


def device_pixels(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 NHWC ``images`` -> the pixel embedder's ``thumb``, ``coarse`` (the image and its
    mirror) and ``fine``, on the images' device."""
    thumbs = pixels.thumbnails(images)
    return {"thumb": thumbs, "coarse": pixels.coarse_views(thumbs), "fine": pixels.fine(thumbs)}


def device_embedding(
    model: torch.nn.Module,
    grabbed: list[torch.Tensor],
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    preprocessing: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC ``images`` on the model's device -> ``views`` (n, V, f + p) and ``probs``
    (n, C), float32 on that device: every zoom view and its mirror in one forward, the
    penultimate features (``grabbed`` by the hook on the last linear layer) summed over each
    mirror pair, beside the views' pixel descriptors. ``preprocessing``: the model's (its
    recorded ``resize``/``center_crop``), for rows stored at another size. No host read."""

    x = images.permute(0, 3, 1, 2).float()
    n = len(x)
    with torch.no_grad():
        views = zoom_views(x / 255.0)
        both = torch.cat([torch.cat([v, v.flip(3)]) for v in views])  # all views and mirrors: one forward
        grabbed.clear()
        # the pipeline's normalisation; it takes NHWC pixel values, and a view of these is free
        pixels_nhwc = (both * 255.0).permute(0, 2, 3, 1)
        if preprocessing:  # the model's resize/crop works on stored pixels: uint8, as every stage feeds it
            pixels_nhwc = preprocess(pixels_nhwc.round().clamp(0, 255).to(torch.uint8), preprocessing)
        logits = model(normalize_tensor(pixels_nhwc, mean, std))
        feats = grabbed[0].float().view(len(views), 2, n, -1).sum(1)  # (V, n, f): view + its mirror
        probs = torch.softmax(logits[:n].float(), 1)
        pixel_parts = torch.stack([pixel_descriptor(v) for v in views])
        return torch.cat([feats, pixel_parts], 2).transpose(0, 1), probs  # (n, V, f + p), (n, C)


def finish(views: np.ndarray, feature_dim: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Centre the model part by its mean over ``rows`` (the dataset's originals; default
    all) and L2-normalise each part and each view: the classifier embedding the kNN compares."""
    feats, pix = views[..., :feature_dim], views[..., feature_dim:]
    mu = feats[:, 0].mean(0) if rows is None else feats[rows, 0].mean(0)
    f = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(feats - mu)), dim=2)
    p = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(pix)), dim=2)
    return (torch.cat([f, p], 2) / np.sqrt(2.0)).numpy().astype(np.float32)
