"""Augmentation ops over whole numpy batches, and the one spec table that declares them.

Every op is ``op(batch, rng, **params) -> batch``: pure (a new dict, inputs untouched),
vectorised over the batch, images uint8 NHWC in and out (float32 inside, rounded back).
An op declared ``keyed`` (``altflip``) also gets the seed and epoch and draws per row
from ``(seed, row index)`` instead of ``rng``, so a row is treated alike in any batch.
``@register`` puts the op and its declared parameters in :data:`OPS`; the parser in
:mod:`effray.data.augment` and the torch twins in :mod:`effray.data.augment_torch` are
driven by that table, so an op's name and signature are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.errors import EffrayError
from effray.registry import Registry

Batch = dict[str, Any]
PAIR = "pair"  # a (float, float) parameter, e.g. resized_crop's aspect-ratio range


@dataclass(frozen=True)
class Param:
    """One declared parameter: what the parser accepts and what the signature shows."""

    name: str
    kind: type | str  # int, float or PAIR
    default: Any
    lo: float
    hi: float

    def coerce(self, value: Any) -> Any:
        """The value in canonical form, or a one-line reason it is not acceptable."""
        if self.kind == PAIR:
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"{self.name} must be a pair (lo, hi), got {value!r}")
            a, b = (Param(self.name, float, 0.0, self.lo, self.hi).coerce(v) for v in value)
            if a > b:
                raise ValueError(f"{self.name} must be ordered (lo <= hi), got {value!r}")
            return (a, b)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be {self.kind.__name__}, got {value!r}")
        if self.kind is int and not isinstance(value, int):
            raise ValueError(f"{self.name} must be int, got {value!r}")
        value = self.kind(value)
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{self.name} must be in [{self.lo:g}, {self.hi:g}], got {value!r}")
        return value

    def __str__(self) -> str:
        kind = "(float, float)" if self.kind == PAIR else self.kind.__name__
        default = f"({self.default[0]:.4g}, {self.default[1]:.4g})" if self.kind == PAIR else repr(self.default)
        return f"{self.name}: {kind} = {default} in [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class OpSpec:
    """A registered op: the numpy function and its declared parameters."""

    name: str
    fn: Callable[..., Batch]
    params: tuple[Param, ...]
    mixes_labels: bool = False  # also gets num_classes; writes batch["target"]
    keyed: bool = False  # also gets seed and epoch: draws per row from (seed, row index), not from the batch's rng
    check: Callable[[dict[str, Any]], str | None] | None = None  # cross-parameter rule

    def signature(self) -> str:
        return f"{self.name}({', '.join(str(p) for p in self.params)})"


OPS: Registry[OpSpec] = Registry("augment op")


def register(
    name: str,
    *params: Param,
    mixes_labels: bool = False,
    check: Callable[[dict[str, Any]], str | None] | None = None,
    keyed: bool = False,
) -> Callable:
    """Decorator: declare an op's parameters next to its numpy implementation."""

    def deco(fn: Callable[..., Batch]) -> Callable[..., Batch]:
        OPS.register(name)(OpSpec(name, fn, params, mixes_labels=mixes_labels, keyed=keyed, check=check))
        return fn

    return deco


def _ordered(lo: str, hi: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda p: f"{lo} must be <= {hi}, got {p[lo]} > {p[hi]}" if p[lo] > p[hi] else None


# ------------------------------------------------------------------ image helpers


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gray(x: np.ndarray) -> np.ndarray:
    """Luma (N,H,W,1) float32 of an NHWC float image (ITU-R 601, as torchvision)."""
    if x.shape[-1] == 1:
        return x
    return (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _blend(x: np.ndarray, other: np.ndarray | float, factor: np.ndarray) -> np.ndarray:
    """factor*x + (1-factor)*other, factor per image (N,); PIL's ImageEnhance formula."""
    f = factor.astype(np.float32).reshape(-1, 1, 1, 1)
    return np.clip(f * x + (1 - f) * other, 0, 255)


def _warp(images: np.ndarray, mats: np.ndarray, border: bool = False) -> np.ndarray:
    """Bilinear affine warp of a uint8 NHWC batch; mats (N,2,3) map output pixel (x,y,1)
    to source pixel coordinates. Outside the image reads zero (or the edge if border),
    as torch's grid_sample(align_corners=True), whose CPU kernel does the sampling: a
    numpy gather of four neighbours is 4-5x slower, and this is the pipeline's hot op."""
    import torch  # deferred: only geometric ops need it

    n, h, w, _ = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    m = mats.astype(np.float32)[:, :, :, None, None]
    sx = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    sy = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    grid = np.stack([sx * (2.0 / max(w - 1, 1)) - 1.0, sy * (2.0 / max(h - 1, 1)) - 1.0], axis=-1)
    src = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    out = torch.nn.functional.grid_sample(
        src, torch.from_numpy(grid), mode="bilinear", padding_mode="border" if border else "zeros", align_corners=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


INT32_INDEX_LIMIT = 2**31 - 1  # pixels per batch up to which int32 indices serve


def _warp_nearest(images: np.ndarray, mats: np.ndarray, mirror: np.ndarray | None = None) -> np.ndarray:
    """Nearest-neighbour affine warp of a uint8 NHWC batch (mats as :func:`_warp`; outside
    reads zero): each output pixel copies the source pixel its coordinates round to. One
    int32 index per pixel and one row gather, no float image: 3x the speed of building
    the index in int64 and gathering per channel, 5x bilinear's. ``mirror`` (N,) bool
    warps the horizontally flipped image instead, at no extra pass (a fused ``flip``)."""
    n, h, w, _ = images.shape
    return _gather_pixels(images, _nearest_source_index(mats, n, h, w, mirror), zero_fill=True)


def _gather_pixels(images: np.ndarray, index: np.ndarray, zero_fill: bool = False) -> np.ndarray:
    """out[i] = pixel ``index[i]`` of the batch's flattened (N*H*W, C) pixels: one row
    gather for every geometric op. With ``zero_fill`` index N*H*W reads a zero pixel."""
    n, h, w, c = images.shape
    pixels = images.reshape(n * h * w, c)
    if zero_fill:
        pixels = np.concatenate([pixels, np.zeros((1, c), np.uint8)])
    return np.take(pixels, index.ravel(), axis=0).reshape(n, h, w, c)


def _index_dtypes(n: int, h: int, w: int) -> tuple[type, type]:
    return (np.int32, np.uint32) if n * h * w < INT32_INDEX_LIMIT else (np.int64, np.uint64)


def _nearest_source_index(mats: np.ndarray, n: int, h: int, w: int, mirror: np.ndarray | None = None) -> np.ndarray:
    """(N,H,W) int32 row of the source pixel each output pixel reads in the batch's
    flattened (N*H*W) pixels, N*H*W where it falls outside. The coordinates are affine,
    so each is a row term plus a column term: one full-size add per axis."""
    m = mats.astype(np.float32)
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    signed, unsigned = _index_dtypes(n, h, w)

    def axis(r: int) -> np.ndarray:
        v = (m[:, r, 0, None] * xs)[:, None, :] + (m[:, r, 1, None] * ys + m[:, r, 2, None])[:, :, None]
        return np.rint(v, out=v).astype(signed)

    ix, iy = axis(0), axis(1)
    if mirror is not None and mirror.any():
        ix[mirror] = (w - 1) - ix[mirror]  # in integers, after rounding: exactly flip-then-warp
    outside = (ix.view(unsigned) >= w) | (iy.view(unsigned) >= h)  # negatives wrap to huge
    iy *= w
    iy += ix
    iy += (np.arange(n, dtype=signed) * (h * w))[:, None, None]
    np.copyto(iy, n * h * w, where=outside)
    return iy


def _rotation(deg: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N,2,3) matrices rotating about the image centre by deg degrees."""
    t = np.deg2rad(deg.astype(np.float64))
    c, s = np.cos(t), np.sin(t)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return np.stack([np.stack([c, -s, cx - c * cx + s * cy], -1), np.stack([s, c, cy - s * cx - c * cy], -1)], 1)


def _zoom(scale: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N,2,3) matrices zooming about the centre by scale (>1 magnifies)."""
    z, inv = np.zeros_like(scale), 1 / scale
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return np.stack([np.stack([inv, z, cx - inv * cx], -1), np.stack([z, inv, cy - inv * cy], -1)], 1)


def _affine_rows(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray, f: np.ndarray
) -> np.ndarray:
    return np.stack([np.stack([a, b, c], -1), np.stack([d, e, f], -1)], 1).astype(np.float32)


def _rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = x.max(-1), x.min(-1)
    d = v - mn
    s = d / np.where(v > 0, v, 1)
    sd = np.where(d > 0, d, 1)
    rc, gc, bc = (v - r) / sd, (v - g) / sd, (v - b) / sd
    h = np.where(v == r, bc - gc, np.where(v == g, 2 + rc - bc, 4 + gc - rc))
    return np.where(d > 0, (h / 6) % 1.0, 0), s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6)
    f = h * 6 - i
    i = (i.astype(np.int64) % 6)[..., None]
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: np.take_along_axis(np.stack(c, -1), i, -1)[..., 0]  # noqa: E731
    return np.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)


def adjust_colour(
    images: np.ndarray,
    bright: np.ndarray,
    contrast: np.ndarray,
    sat: np.ndarray,
    hue: np.ndarray | None,
) -> np.ndarray:
    """Colour jitter with given per-image factors (hue None: skip the lossy HSV round trip)."""
    x = images.astype(np.float32)
    x = _blend(x, 0.0, bright)
    x = _blend(x, _gray(x).mean(axis=(1, 2, 3), keepdims=True), contrast)
    if x.shape[-1] == 3:
        x = _blend(x, _gray(x), sat)
        if hue is not None:
            h, s, v = _rgb_to_hsv(x / 255)
            x = _hsv_to_rgb((h + hue.astype(np.float32)[:, None, None]) % 1.0, s, v) * 255
    return _to_u8(x)


# ------------------------------------------------------------------ ops


@register("crop", Param("padding", int, 4, 0, 64))
def crop(batch: Batch, rng: np.random.Generator, padding: int = 4) -> Batch:
    """Random crop of the reflect-padded image back to HxW (airbench's batch_crop)."""
    return crop_flip(batch, rng, {"padding": padding}, None)


def _reflect(i: np.ndarray, size: int) -> np.ndarray:
    i = np.abs(i)
    return np.where(i > size - 1, 2 * (size - 1) - i, i)


@register("flip", Param("p", float, 0.5, 0, 1))
def flip(batch: Batch, rng: np.random.Generator, p: float = 0.5) -> Batch:
    """Horizontal mirror of each image with probability p."""
    img = batch["image"]
    hit = rng.random(len(img)) < p
    out = img.copy()  # then mirror only the hits: 4x cheaper than a where over the batch
    out[hit] = img[hit, :, ::-1]
    return {**batch, "image": out}


def row_key(index: Any, synthetic: Any = None) -> Any:
    """Each row's identity across epochs and ranks, from int64 ``index`` and 0/1 int64
    ``synthetic`` (numpy or torch alike): its index, synthetic rows (which number their
    own) moved past every real one."""
    return index if synthetic is None else index + synthetic * (1 << 40)


def row_keys(batch: Batch) -> np.ndarray:
    """:func:`row_key` of every row of a numpy batch."""
    synthetic = np.asarray(batch["synthetic"]).astype(np.int64) if "synthetic" in batch else None
    return row_key(np.asarray(batch["index"]).astype(np.int64), synthetic)


def row_bits(keys: Any, seed: int) -> Any:
    """One pseudo-random bit per row key (numpy or torch int64, same bits on both): a
    31-bit integer hash of (seed, key), all in non-negative int64 so nothing overflows."""
    mask = 0x7FFFFFFF
    h = (keys ^ (keys >> 31) ^ ((int(seed) * 0x9E3779B1) & mask)) & mask
    for _ in range(2):
        h = (h * 0x045D9F3B) & mask
        h = h ^ (h >> 16)
    return (h >> 11) & 1


@register("altflip", keyed=True)
def altflip(batch: Batch, rng: np.random.Generator, seed: int = 0, epoch: int = 0) -> Batch:
    """airbench's alternating flip: each image mirrored at random in epoch 0 (a bit of
    (seed, row index)) and then on every other epoch, so over two epochs every image is
    seen both ways (plain ``flip`` leaves a quarter of them one way only)."""
    hit = (row_bits(row_keys(batch), seed) ^ (int(epoch) & 1)).astype(bool)
    img = batch["image"]
    out = img.copy()
    out[hit] = img[hit, :, ::-1]
    return {**batch, "image": out}


@register("rotate", Param("degrees", float, 10.0, 0, 180), Param("bilinear", int, 0, 0, 1))
def rotate(batch: Batch, rng: np.random.Generator, degrees: float = 10.0, bilinear: int = 0) -> Batch:
    """Rotation by U(-degrees, degrees) about the centre, zero fill; nearest-neighbour, as
    torchvision's RandomRotation, unless ``bilinear=1`` (smoother, about twice the cost)."""
    return flip_rotate(batch, rng, None, {"degrees": degrees, "bilinear": bilinear})


# -- fused pairs: two geometric ops in one gather, drawing exactly what the pair draws in
# sequence (the policy uses them where the chain allows; tests hold them to the pair)


def crop_flip(
    batch: Batch, rng: np.random.Generator, crop_params: dict[str, Any], flip_params: dict[str, Any] | None
) -> Batch:
    """``crop`` then (unless None) ``flip``: the flip reverses the crop's column index."""
    img = batch["image"]
    n, h, w, _ = img.shape
    padding = crop_params["padding"]
    if padding >= min(h, w):
        raise EffrayError(f"crop(padding={padding}) needs images larger than {padding} px, got {h}x{w}")
    signed, _ = _index_dtypes(n, h, w)
    dy, dx = (rng.integers(0, 2 * padding + 1, n) - padding for _ in range(2))
    rows = _reflect(dy[:, None] + np.arange(h), h).astype(signed)
    cols = _reflect(dx[:, None] + np.arange(w), w).astype(signed)
    if flip_params is not None:
        hit = rng.random(n) < flip_params["p"]
        cols[hit] = cols[hit, ::-1]
    index = (rows * w + (np.arange(n, dtype=signed) * (h * w))[:, None])[:, :, None] + cols[:, None, :]
    return {**batch, "image": _gather_pixels(img, index)}


def flip_rotate(
    batch: Batch, rng: np.random.Generator, flip_params: dict[str, Any] | None, rotate_params: dict[str, Any]
) -> Batch | None:
    """(unless None) ``flip`` then ``rotate``: nearest rotation mirrors its source index;
    None when the rotation is bilinear (no exact fusion: the pair runs in turn)."""
    img = batch["image"]
    if rotate_params["bilinear"] and flip_params is not None:
        return None
    mirror = rng.random(len(img)) < flip_params["p"] if flip_params is not None else None
    degrees = rotate_params["degrees"]
    mats = _rotation(rng.uniform(-degrees, degrees, len(img)), *img.shape[1:3])
    return {**batch, "image": _warp(img, mats) if rotate_params["bilinear"] else _warp_nearest(img, mats, mirror)}


FUSED_PAIRS: dict[tuple[str, str], Callable[..., Batch | None]] = {
    ("crop", "flip"): crop_flip,
    ("flip", "rotate"): flip_rotate,
}


@register(
    "resized_crop",
    Param("min_scale", float, 0.35, 0.01, 1),
    Param("max_scale", float, 1.0, 0.01, 1),
    Param("ratio", PAIR, (3 / 4, 4 / 3), 0.1, 10),
    check=_ordered("min_scale", "max_scale"),
)
def resized_crop(
    batch: Batch,
    rng: np.random.Generator,
    min_scale: float = 0.35,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Batch:
    """Inception-style crop: area fraction and log-aspect uniform, resized back to HxW.
    Boxes that would not fit are clipped to the image (torchvision retries instead)."""
    img = batch["image"]
    n, h, w, _ = img.shape
    area = rng.uniform(min_scale, max_scale, n)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), n))
    cw = np.minimum(np.sqrt(area * aspect) * w, w)
    ch = np.minimum(np.sqrt(area / aspect) * h, h)
    x0, y0 = rng.random(n) * (w - cw), rng.random(n) * (h - ch)
    sx, sy, z = cw / w, ch / h, np.zeros(n)
    mats = _affine_rows(sx, z, x0 + 0.5 * sx - 0.5, z, sy, y0 + 0.5 * sy - 0.5)
    return {**batch, "image": _warp(img, mats, border=True)}


@register(
    "scale",
    Param("min", float, 0.9, 0.1, 10),
    Param("max", float, 1.1, 0.1, 10),
    check=_ordered("min", "max"),
)
def scale(batch: Batch, rng: np.random.Generator, min: float = 0.9, max: float = 1.1) -> Batch:  # noqa: A002
    """Zoom about the centre by U(min, max); zooming out fills with zero."""
    img = batch["image"]
    s = rng.uniform(min, max, len(img))
    return {**batch, "image": _warp(img, _zoom(s, *img.shape[1:3]))}


@register(
    "jitter",
    Param("brightness", float, 0.4, 0, 5),
    Param("contrast", float, 0.4, 0, 5),
    Param("saturation", float, 0.4, 0, 5),
    Param("hue", float, 0.1, 0, 0.5),
)
def jitter(
    batch: Batch,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> Batch:
    """ColorJitter: factors U(max(0,1-s), 1+s), hue shift U(-hue, hue) turns of the wheel.
    Order is fixed (brightness, contrast, saturation, hue), not shuffled per call."""
    n = len(batch["image"])
    f = [rng.uniform(max(0.0, 1 - s), 1 + s, n) for s in (brightness, contrast, saturation)]
    h = rng.uniform(-hue, hue, n)
    return {**batch, "image": adjust_colour(batch["image"], *f, h if hue > 0 else None)}


@register("grayscale", Param("p", float, 0.2, 0, 1))
def grayscale(batch: Batch, rng: np.random.Generator, p: float = 0.2) -> Batch:
    """Replace an image by its luma in every channel with probability p (keeps C)."""
    img = batch["image"]
    hit = rng.random(len(img)) < p
    gray = np.broadcast_to(_to_u8(_gray(img.astype(np.float32))), img.shape)
    return {**batch, "image": np.where(hit[:, None, None, None], gray, img)}


@register("noise", Param("std", float, 0.05, 0, 1))
def noise(batch: Batch, rng: np.random.Generator, std: float = 0.05) -> Batch:
    """Additive Gaussian noise, std as a fraction of 255."""
    img = batch["image"]
    return {**batch, "image": _to_u8(img + rng.normal(0, std * 255, img.shape).astype(np.float32))}


@register("cutout", Param("size", int, 8, 0, 256))
def cutout(batch: Batch, rng: np.random.Generator, size: int = 8) -> Batch:
    """Zero one size x size square per image, centre uniform in the image, clipped at borders."""
    img = batch["image"]
    n, h, w, _ = img.shape
    y0 = rng.integers(0, h, n)[:, None, None] - size // 2
    x0 = rng.integers(0, w, n)[:, None, None] - size // 2
    ys, xs = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return {**batch, "image": np.where(hole[..., None], np.uint8(0), img)}


def soft_target(batch: Batch, num_classes: int) -> np.ndarray:
    """The batch's soft labels: its "target" if a mix already made one, else one-hot labels."""
    if "target" in batch:
        return batch["target"].astype(np.float32)
    label = np.asarray(batch["label"])
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise EffrayError(f"labels must be in [0, {num_classes}) to mix them, got {label.min()}..{label.max()}")
    return np.eye(num_classes, dtype=np.float32)[label]


def _beta(rng: np.random.Generator, alpha: float) -> float:
    return float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0


@register("mixup", Param("alpha", float, 0.2, 0, 100), mixes_labels=True)
def mixup(batch: Batch, rng: np.random.Generator, alpha: float = 0.2, num_classes: int = 10) -> Batch:
    """Mix each image with a random partner: lam ~ Beta(alpha, alpha), one lam per batch."""
    img = batch["image"]
    lam, perm = _beta(rng, alpha), rng.permutation(len(img))
    mixed = lam * img.astype(np.float32) + (1 - lam) * img[perm].astype(np.float32)
    target = soft_target(batch, num_classes)
    return {**batch, "image": _to_u8(mixed), "target": lam * target + (1 - lam) * target[perm]}


@register("cutmix", Param("alpha", float, 1.0, 0, 100), mixes_labels=True)
def cutmix(batch: Batch, rng: np.random.Generator, alpha: float = 1.0, num_classes: int = 10) -> Batch:
    """Paste one box from a random partner (area 1-lam, lam ~ Beta); labels weighted by the
    pasted area after clipping to the image, so targets match pixels exactly."""
    img = batch["image"]
    n, h, w, _ = img.shape
    lam, perm = _beta(rng, alpha), rng.permutation(n)
    bh, bw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = np.clip([cy - bh // 2, cy - bh // 2 + bh], 0, h)
    x0, x1 = np.clip([cx - bw // 2, cx - bw // 2 + bw], 0, w)
    out = img.copy()
    out[:, y0:y1, x0:x1] = img[perm, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    target = soft_target(batch, num_classes)
    return {
        **batch,
        "image": out,
        "target": (lam * target + (1 - lam) * target[perm]).astype(np.float32),
    }
