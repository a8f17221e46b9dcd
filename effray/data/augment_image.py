"""Pixel arithmetic the augmentation ops share, on uint8 NHWC tensors on any device.

Nothing here reads a value back to the host or builds a tensor from host data inside a
call (constants are Python scalars), so the same code runs on a CPU inside a Ray Data
task and on the training GPU without a sync. Ops that copy whole pixels (crop, flip,
nearest rotation) compute each output pixel's source row in the batch's flattened
``(N*H*W, C)`` pixels and make one ``index_select``: no float image, a fraction of an
interpolating warp's cost, and the pipeline's hot path. Interpolating warps (bilinear
rotation, zoom, resized crop, RandAugment's geometry) use ``grid_sample``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
INT32_INDEX_LIMIT = 2**31 - 1  # pixels per batch up to which int32 indices serve
FLOAT32_EXACT_LIMIT = 2**24  # ... and float32 counts them exactly

# ------------------------------------------------------------------ draws from the batch's generator


def rand(g: torch.Generator, n: int) -> Tensor:
    """``n`` uniform [0, 1) floats on the generator's device."""
    return torch.rand((n,), generator=g, device=g.device)


def uniform(g: torch.Generator, lo: float, hi: float, n: int) -> Tensor:
    return lo + (hi - lo) * rand(g, n)


def randint(g: torch.Generator, high: int, n: int) -> Tensor:
    """``n`` integers in [0, high) (int64) on the generator's device."""
    return torch.randint(0, high, (n,), generator=g, device=g.device)


# ------------------------------------------------------------------ values


def to_u8(x: Tensor) -> Tensor:
    """A float batch as uint8: rounded half to even (in place: ``x`` is a temporary) and saturated."""
    return x.round_().clamp_(0, 255).to(torch.uint8)


def gray(x: Tensor) -> Tensor:
    """Luma (N,H,W,1) of a float NHWC batch (ITU-R 601, as torchvision); 1-channel as is."""
    if x.shape[-1] == 1:
        return x
    # Python-scalar weights: a weight tensor would be a host-to-device copy per call
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """``factor*x + (1-factor)*other``, factor per image (N,): PIL's ImageEnhance formula."""
    f = factor.float().view(-1, 1, 1, 1)
    out = x * f if isinstance(other, float) and other == 0 else torch.lerp(torch.as_tensor(other).to(x), x, f)
    return out.clamp_(0, 255)


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3) RGB in [0, 1] -> hue (turns), saturation, value, each (...); any float dtype."""
    r, g, b = x.unbind(-1)
    v, mn = x.amax(-1), x.amin(-1)
    d = v - mn
    s = d / torch.where(v > 0, v, 1)
    sd = torch.where(d > 0, d, 1)
    rc, gc, bc = (v - r) / sd, (v - g) / sd, (v - b) / sd
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))
    return torch.where(d > 0, (h / 6) % 1.0, 0), s, v


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """The inverse of :func:`rgb_to_hsv`: (..., 3) RGB in [0, 1]."""
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = (i.long() % 6).unsqueeze(-1)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c, -1).gather(-1, i).squeeze(-1)  # noqa: E731
    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)


def adjust_colour(images: Tensor, bright: Tensor, contrast: Tensor, sat: Tensor, hue: Tensor | None) -> Tensor:
    """Colour jitter with given per-image factors (N,) (hue None: skip the lossy HSV round trip)."""
    x = blend(images.float(), 0.0, bright)
    x = blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
    if x.shape[-1] == 3:
        x = blend(x, gray(x), sat)
        if hue is not None:
            h, s, v = rgb_to_hsv(x / 255)
            x = hsv_to_rgb((h + hue.float().view(-1, 1, 1)) % 1.0, s, v) * 255
    return to_u8(x)


# ------------------------------------------------------------------ geometry


def affine(*entries: Tensor) -> Tensor:
    """(N,2,3) matrices from six per-image entries, row-major. A matrix maps an output
    pixel's (x, y, 1) to the source pixel it reads, in pixel coordinates."""
    return torch.stack(entries, -1).float().view(-1, 2, 3)


def rotation(deg: Tensor, h: int, w: int) -> Tensor:
    """(N,2,3) matrices rotating about the image centre by ``deg`` degrees."""
    t = torch.deg2rad(deg.double())  # float64: a float32 cosine moves rounding ties of nearest rotations
    c, s = torch.cos(t), torch.sin(t)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return affine(c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)


def reflect(i: Tensor, size: int) -> Tensor:
    """Indexes past either edge mirrored back in (reflect padding, edge not repeated)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def index_dtype(n: int, h: int, w: int) -> torch.dtype:
    return torch.int32 if n * h * w < INT32_INDEX_LIMIT else torch.int64


def row_offsets(n: int, h: int, w: int, device: torch.device) -> Tensor:
    """(N,1,1) offset of each image's first pixel in the batch's flattened pixels."""
    return (torch.arange(n, dtype=index_dtype(n, h, w), device=device) * (h * w)).view(-1, 1, 1)


def gather_pixels(images: Tensor, index: Tensor) -> Tensor:
    """``out[i] = pixel index[i]`` of the batch's flattened (N*H*W, C) pixels: one row
    gather for every pixel-copying op."""
    n, h, w, c = images.shape
    return images.reshape(n * h * w, c).index_select(0, index.reshape(-1)).view(*index.shape, c)


def nearest_source_index(mats: Tensor, n: int, h: int, w: int, mirror: Tensor | None = None) -> Tensor:
    """(N,H,W) row of the source pixel each output pixel reads, in the flattened pixels of
    the batch framed by a one-pixel zero border (:func:`warp_nearest`): coordinates
    outside the image clamp onto the border, so no mask is needed. The coordinates are
    affine, so each is a row term plus a column term: one full-size add per axis; up to
    2**24 pixels the rows are counted in float32 (exact there) and converted once.
    ``mirror`` (N,) bool reads the mirrored image instead (a fused flip)."""
    rows, dev = n * (h + 2) * (w + 2), mats.device
    count = torch.float32 if rows <= FLOAT32_EXACT_LIMIT else index_dtype(n, h + 2, w + 2)  # what the rows add in
    m = mats.float()
    xs, ys = torch.arange(w, dtype=torch.float32, device=dev), torch.arange(h, dtype=torch.float32, device=dev)

    def axis(r: int, size: int) -> Tensor:
        v = (m[:, r, 0, None] * xs)[:, None, :] + (m[:, r, 1, None] * ys + m[:, r, 2, None])[:, :, None]
        return v.round_().clamp_(-1, size).to(count)

    ix, iy = axis(0, w), axis(1, h)
    # each image's pixel (0, 0), inside its border
    first = (torch.arange(n, dtype=count, device=dev) * ((h + 2) * (w + 2)) + (w + 3)).view(-1, 1, 1)
    if mirror is not None:  # column w-1-x after rounding: exactly flip-then-warp
        flipped = mirror.view(-1, 1, 1).to(count)
        ix.mul_(1 - 2 * flipped)
        first = first + flipped * (w - 1)
    return iy.mul_(w + 2).add_(ix).add_(first).to(index_dtype(n, h + 2, w + 2))


def warp_nearest(images: Tensor, mats: Tensor, mirror: Tensor | None = None) -> Tensor:
    """Nearest-neighbour affine warp (mats as :func:`affine`; outside reads zero): each
    output pixel copies the source pixel its coordinates round to."""
    n, h, w, _ = images.shape
    framed = F.pad(images, (0, 0, 1, 1, 1, 1))  # copying a uint8 batch costs less than masking
    return gather_pixels(framed, nearest_source_index(mats.to(images.device), n, h, w, mirror))


def warp(images: Tensor, mats: Tensor, border: bool = False) -> Tensor:
    """Bilinear affine warp of a uint8 NHWC batch (mats as :func:`affine`): outside reads
    zero, or the edge with ``border``, as ``grid_sample(align_corners=True)``."""
    n, h, w, _ = images.shape
    if n == 0:  # grid_sample rejects empty batches
        return images.clone()
    dev = images.device
    sx, sy = max(w - 1, 1) / 2, max(h - 1, 1) / 2  # [-1, 1] <-> pixels, align_corners=True
    # theta = to_norm @ [mats; 0 0 1] @ to_px with to_px = [[sx,0,sx],[0,sy,sy],[0,0,1]] and
    # to_norm its inverse, written out: scalars only, no host-to-device copy of constants
    m = mats.to(dev).float()
    (a, b, c), (d, e, f) = m[:, 0].unbind(1), m[:, 1].unbind(1)
    theta = torch.stack(
        [
            torch.stack([a, b * (sy / sx), (a * sx + b * sy + c) / sx - 1], 1),
            torch.stack([d * (sx / sy), e, (d * sx + e * sy + f) / sy - 1], 1),
        ],
        1,
    )
    # affine_grid(theta, align_corners=True) as one batched matmul over the pixel centres
    # (cuDNN's affine-grid kernel buys nothing at these sizes)
    ys, xs = torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev)
    base = torch.stack([xs.expand(h, w), ys.view(-1, 1).expand(h, w), torch.ones(h, w, device=dev)], -1)
    grid = (base.view(1, h * w, 3) @ theta.transpose(1, 2)).view(n, h, w, 2)
    out = F.grid_sample(
        images.permute(0, 3, 1, 2).float(),
        grid,
        mode="bilinear",
        padding_mode="border" if border else "zeros",
        align_corners=True,
    )
    return to_u8(out).permute(0, 2, 3, 1).contiguous()
