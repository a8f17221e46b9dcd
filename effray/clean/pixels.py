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

import functools

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
    """``z`` px cut from (``z`` > 0) or edge-padded to (< 0) every side, resized back
    (bilinear, antialiased)."""
    if z == 0:
        return x
    side = x.shape[-1]
    if z > 0:
        x = x[:, :, z : side - z, z : side - z]
    else:
        x = F.pad(x, (-z, -z, -z, -z), mode="replicate")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


@functools.lru_cache(maxsize=8)
def _axis_operators(device: torch.device) -> torch.Tensor:
    """(ZOOMS, SHIFTS * FINE, THUMB): for each zoom, the linear map of one image axis onto
    each shift's fine grid. Zooming (separable resampling), shifting by ``d`` px (edges
    repeated) and 2 x 2 pooling are all linear along each axis, so a view is ``A x A^T``:
    small matmuls instead of resampling every image once per view."""
    eye = torch.eye(THUMB)[:, None, :, None].expand(THUMB, 1, THUMB, THUMB)  # basis rows, constant along x
    zooms = torch.stack([_zoom(eye, z)[:, 0, :, 0].T for z in ZOOMS])  # (Z, T out, T in)
    ratio = THUMB // FINE
    pools = []
    for d in SHIFTS:  # a view moved by d px: cell r averages source rows ratio*r - d ... (edges repeated)
        rows = torch.zeros(FINE, THUMB)
        for r in range(FINE):
            for k in range(ratio):
                rows[r, min(max(ratio * r + k - d, 0), THUMB - 1)] += 1.0 / ratio
        pools.append(rows)
    pool = torch.cat(pools)  # (S * F, T)
    return (pool @ zooms).to(device)  # (Z, S * F, T)


def fine_views(thumbs: torch.Tensor) -> torch.Tensor:
    """uint8 thumbnails -> (n, VIEWS, C * FINE^2): every zoom x shift x mirror view's fine
    descriptor, on the thumbnails' device (:func:`_axis_operators`: two batched matmuls).
    Standardising commutes with the mirror, so it is taken last, on the standardised grid."""
    x = _floats(thumbs)
    n, c = x.shape[:2]
    ops = _axis_operators(x.device)
    s = len(SHIFTS)
    y = torch.einsum("zau,nchu->nzcha", ops, x)  # columns mapped: (n, Z, C, T, S * F)
    y = torch.einsum("zbh,nzcha->nzcba", ops, y)  # rows mapped: (n, Z, C, S * F, S * F)
    y = y.reshape(n, len(ZOOMS), c, s, FINE, s, FINE).permute(0, 1, 3, 5, 2, 4, 6)  # (n, Z, dy, dx, C, F, F)
    flat = y.reshape(-1, c * FINE * FINE)  # a fresh copy: standardised in place
    flat -= flat.mean(1, keepdim=True)
    flat /= flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    grid = flat.view(-1, c, FINE, FINE)
    both = torch.stack([grid, grid.flip(3)], 1)
    return both.reshape(n, -1, c * FINE * FINE)


def best_view_similarity(views: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(n, V, d)`` query views x ``(n, m, d)`` each query's own candidates -> ``(n, m)``,
    the best cosine over the views."""
    return torch.einsum("nvd,nmd->nvm", views, keys).amax(1)
