"""The pixel embedder (``--embedder pixels``, the default): alignment-tolerant pixel
similarity, computed on the data itself, no network.

Every image becomes a :data:`THUMB` x :data:`THUMB` thumbnail (area-averaged when larger,
bilinear when smaller) kept as uint8. Two descriptors come from it, each standardised
per image (mean over pixels and channels removed, L2-normalised: brightness and a
uniform contrast change drop out):

- *coarse*: :data:`COARSE` x :data:`COARSE` area averages, the first, cheap pass of the
  kNN that shortlists candidates (a query compares itself and its mirror);
- *fine*: :data:`FINE` x :data:`FINE`, compared after an alignment search: the query's
  thumbnail zoomed in and out (:data:`ZOOMS` px per side at thumbnail size), shifted by
  :data:`SHIFTS` px and mirrored, the best cosine over those :data:`VIEWS` views against
  the candidate's original.

Why: measured against ciFAIR's human-checked CIFAR-10 pairs (``bench/leak_probe.py``), a
re-shot or re-cropped copy keeps its layout and colours, which a classifier's features
(trained to tell classes apart, not photos) blur; the zoom and shift search aligns a
re-crop with its source, and pooling to 16 x 16 after sub-pixel shifts forgives what
is left. Finer grids, larger shifts and per-channel colour standardisation scored
worse there; zooms out as well as in are what re-crops at another scale need.
"""

from __future__ import annotations

import itertools

import torch
from torch.nn import functional as F

THUMB = 32  # thumbnail side: every image is compared at this size
COARSE = 8  # the shortlist's grid
FINE = THUMB // 2  # the alignment search's grid: 2 x 2 cells of the thumbnail
ZOOMS = (-2, -1, 0, 1, 2)  # px cut from (>0) or padded to (<0) every side of the thumbnail, resized back
SHIFTS = (-1, 0, 1)  # px, each axis, at thumbnail size (sub-pixel at the fine grid)
VIEWS = len(ZOOMS) * len(SHIFTS) ** 2 * 2  # x2: and mirrored


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images (any size, on any device) -> uint8 NCHW :data:`THUMB`-px thumbnails."""
    x = images.permute(0, 3, 1, 2).float()
    if tuple(x.shape[2:]) != (THUMB, THUMB):
        big = x.shape[2] >= THUMB and x.shape[3] >= THUMB
        x = F.interpolate(x, size=(THUMB, THUMB), mode="area" if big else "bilinear", align_corners=None)
    return x.round().clamp(0, 255).to(torch.uint8)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, d): each row's mean removed, L2-normalised."""
    v = x.flatten(1)
    return F.normalize(v - v.mean(1, keepdim=True), dim=1)


def _floats(thumbs: torch.Tensor) -> torch.Tensor:
    return thumbs.float() / 255.0


def coarse(thumbs: torch.Tensor) -> torch.Tensor:
    """uint8 thumbnails -> (n, C * COARSE^2) float32 coarse descriptors."""
    return standardise(F.adaptive_avg_pool2d(_floats(thumbs), COARSE))


def coarse_views(thumbs: torch.Tensor) -> torch.Tensor:
    """(n, 2, d): the coarse descriptor of each thumbnail and of its mirror (a query's views)."""
    x = _floats(thumbs)
    return torch.stack([standardise(F.adaptive_avg_pool2d(v, COARSE)) for v in (x, x.flip(3))], 1)


def fine(thumbs: torch.Tensor) -> torch.Tensor:
    """uint8 thumbnails -> (n, C * FINE^2) float32 fine descriptors (the keys' originals)."""
    return standardise(F.adaptive_avg_pool2d(_floats(thumbs), FINE))


def _zoom(x: torch.Tensor, z: int) -> torch.Tensor:
    if z == 0:
        return x
    side = x.shape[-1]
    if z > 0:
        x = x[:, :, z : side - z, z : side - z]
    else:
        x = F.pad(x, (-z, -z, -z, -z), mode="replicate")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def fine_views(thumbs: torch.Tensor) -> torch.Tensor:
    """uint8 thumbnails -> (n, VIEWS, C * FINE^2): every zoom x shift x mirror view's fine
    descriptor, on the thumbnails' device, in a handful of batched ops. A shift by ``d`` px
    then 2 x 2 pooling is one 2 x 2 pooling at stride 1 of the edge-padded zoom, read every
    other cell from ``1 - d``; pooling and standardising commute with the mirror, so it is
    taken last, on the standardised grid."""
    x = _floats(thumbs)
    n, c = x.shape[:2]
    zoomed = torch.stack([_zoom(x, z) for z in ZOOMS], 1).flatten(0, 1)  # (n * Z, C, T, T)
    pad = max(abs(d) for d in SHIFTS)
    every = F.avg_pool2d(F.pad(zoomed, (pad,) * 4, mode="replicate"), 2, stride=1)  # every 2 x 2 window
    span = 2 * FINE - 1
    grids = [
        every[:, :, pad - dy : pad - dy + span : 2, pad - dx : pad - dx + span : 2]
        for dy, dx in itertools.product(SHIFTS, SHIFTS)
    ]
    grid = standardise(torch.stack(grids, 1).flatten(0, 1)).view(-1, c, FINE, FINE)  # (n * Z * S, C, F, F)
    both = torch.stack([grid, grid.flip(3)], 1)
    return both.reshape(n, -1, c * FINE * FINE)


def best_view_similarity(views: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(n, V, d)`` query views x ``(n, m, d)`` each query's own candidates -> ``(n, m)``,
    the best cosine over the views."""
    return torch.einsum("nvd,nmd->nvm", views, keys).amax(1)
