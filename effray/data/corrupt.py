"""CIFAR-10-C-style corruptions at 5 severities, built from our own batch ops: no download.

Hendrycks & Dietterich (ICLR 2019) made CIFAR-10-C by corrupting the test set with
``make_cifar_c.py``; the severity parameters here are that script's. Every corruption
is ``fn(images, rngs, severity) -> images``: uint8 NHWC in and out (float in [0, 1]
inside), vectorised over the batch except JPEG (an encoder per image, as theirs).
Severity 0 is the identity. Randomness is per image, from ``(seed, corruption, severity,
row index)``, so a corrupted split is the same whichever batches Ray Data makes of it.

Where ours differ from theirs:

* the result is rounded to uint8, theirs truncated (``np.uint8(x)``): ours are up to one
  level brighter, which is inside JPEG's and the noises' own error;
* ``gaussian_blur`` is a separable Gaussian truncated at 4 sigma with edge padding, as
  ``skimage.filters.gaussian`` computes it (``mode="nearest"``);
* ``defocus_blur``'s disk kernel is anti-aliased by our own 3x3 Gaussian (theirs: OpenCV's
  ``GaussianBlur`` of the same size and sigma, the same weights), applied with reflect-101
  borders as OpenCV's ``filter2D``;
* ``pixelate`` resamples with PIL's BOX weights as a matrix over the whole batch (PIL
  rounds each pass to 8 bits; ours rounds once, within one level of theirs);
* the published ``saturate`` is not monotone in severity (it desaturates at 1-2 and
  over-saturates at 3-5); we keep the published parameters.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from effray.data.augment_image import hsv_to_rgb, rgb_to_hsv
from effray.errors import EffrayError

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[np.ndarray, list[np.random.Generator], int], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}


def _corruption(name: str) -> Callable[[Corruption], Corruption]:
    def add(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        return fn

    return add


def _f(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _per_image(rngs: list[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    return np.stack([draw(g) for g in rngs])


# ------------------------------------------------------------------ noise


@_corruption("gaussian_noise")
def gaussian_noise(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    x = _f(images)
    return _u8(x + _per_image(rngs, lambda g: g.normal(0.0, c, x.shape[1:])).astype(np.float32))


@_corruption("shot_noise")
def shot_noise(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    c = [500, 250, 100, 75, 50][severity - 1]
    x = _f(images)
    return _u8(np.stack([g.poisson(xi * c) for g, xi in zip(rngs, x)]) / c)


@_corruption("impulse_noise")
def impulse_noise(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    """Salt and pepper on a fraction ``c`` of the values (every channel on its own), half
    each, as ``skimage.util.random_noise(mode="s&p")``."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    x = _f(images)
    hit = _per_image(rngs, lambda g: g.random((2, *x.shape[1:])))
    return _u8(np.where(hit[:, 0] < c, (hit[:, 1] < 0.5).astype(np.float32), x))


# ------------------------------------------------------------------ blur


def _correlate(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """2-D correlation of every image and channel (NHWC) with ``kernel`` (kh, kw, odd)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=pad_mode)
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j]:
                out += kernel[i, j] * padded[:, i : i + h, j : j + w]
    return out


def _gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@_corruption("gaussian_blur")
def gaussian_blur(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    k = _gaussian_1d(sigma, int(4.0 * sigma + 0.5))
    x = _correlate(_f(images), k[:, None], "edge")
    return _u8(_correlate(x, k[None, :], "edge"))


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """``make_cifar_c.py``'s ``disk``: the pixels within ``radius`` on a 17x17 grid, summing
    to 1, then a 3x3 Gaussian of ``alias_blur`` over it (reflect-101 borders); cropped to
    its non-zero support."""
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = _gaussian_1d(alias_blur, 1)
    smooth = _correlate(disk[None, :, :, None], np.outer(g, g), "reflect")[0, :, :, 0]
    rows, cols = np.nonzero(smooth > 1e-12)
    r = max(8 - rows.min(), rows.max() - 8, 8 - cols.min(), cols.max() - 8)
    return smooth[8 - r : 9 + r, 8 - r : 9 + r]


@_corruption("defocus_blur")
def defocus_blur(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    return _u8(_correlate(_f(images), disk_kernel(radius, alias), "reflect"))


# ------------------------------------------------------------------ colour


@_corruption("contrast")
def contrast(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = _f(images)
    means = x.mean(axis=(1, 2), keepdims=True)  # per image and channel
    return _u8((x - means) * c + means)


def _hsv_shift(images: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    x = _f(images)
    if x.shape[-1] != 3:
        raise EffrayError(f"this corruption needs RGB images, got {x.shape[-1]} channel(s)")
    hsv = list(rgb_to_hsv(torch.from_numpy(x)))  # the augmentation library's conversions, on CPU tensors
    hsv[channel] = (hsv[channel] * scale + shift).clamp(0.0, 1.0)
    return _u8(hsv_to_rgb(*hsv).numpy())


@_corruption("brightness")
def brightness(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    return _hsv_shift(images, 2, 1.0, [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1])


@_corruption("saturate")
def saturate(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    scale, shift = [(0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)][severity - 1]
    return _hsv_shift(images, 1, scale, shift)


# ------------------------------------------------------------------ digital


def box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PIL's BOX resampling weights from ``n_in`` to ``n_out`` pixels, as an (out, in) matrix."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        x = (np.arange(lo, hi) - center + 0.5) / max(scale, 1.0)
        w = ((x > -0.5) & (x <= 0.5)).astype(np.float64)
        m[i, lo:hi] = w / w.sum() if w.sum() else 0.0
    return m.astype(np.float32)


@_corruption("pixelate")
def pixelate(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = images.shape[1:3]
    sh, sw = int(h * c), int(w * c)
    down_h, down_w, up_h, up_w = box_matrix(h, sh), box_matrix(w, sw), box_matrix(sh, h), box_matrix(sw, w)
    x = _f(images)
    small = np.einsum("ah,nhwc,bw->nabc", down_h, x, down_w, optimize=True)
    return _u8(np.einsum("ha,nabc,wb->nhwc", up_h, small, up_w, optimize=True))


@_corruption("jpeg_compression")
def jpeg_compression(images: np.ndarray, rngs: list[np.random.Generator], severity: int) -> np.ndarray:
    from PIL import Image

    quality = [80, 65, 58, 50, 40][severity - 1]
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buf))
        out.append(decoded.reshape(img.shape))
    return np.stack(out) if out else images.copy()


# ------------------------------------------------------------------ batches


def corrupt(
    images: np.ndarray, name: str, severity: int, *, seed: int = 0, rows: np.ndarray | None = None
) -> np.ndarray:
    """``images`` (uint8 NHWC) under corruption ``name`` at ``severity`` (0 = unchanged).
    ``rows``: each image's row id in its split, which seeds its own randomness."""
    if name not in CORRUPTIONS:
        raise EffrayError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in (0, *SEVERITIES):
        raise EffrayError(f"corruption severity must be 0-5, got {severity}")
    if severity == 0:
        return images.copy()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    key = list(CORRUPTIONS).index(name)
    rngs = [np.random.default_rng(np.random.SeedSequence([int(seed), key, int(severity), int(r)])) for r in rows]
    return CORRUPTIONS[name](images, rngs, severity)


def corrupt_batch(batch: dict[str, Any], name: str, severity: int, seed: int = 0) -> dict[str, Any]:
    """A Ray Data batch (``image``, ``label``, ``index``) with its images corrupted."""
    return {**batch, "image": corrupt(batch["image"], name, severity, seed=seed, rows=batch.get("index"))}


def parse_corruptions(spec: str) -> list[str]:
    """``all``, or a comma-separated list of corruption names."""
    names = list(CORRUPTIONS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise EffrayError(f"unknown corruption {unknown[0]!r} in --corruptions; valid: all, {', '.join(CORRUPTIONS)}")
    return names


def parse_severities(spec: str) -> list[int]:
    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or not set(values) <= set(SEVERITIES):
        raise EffrayError(f"--severities must be a comma-separated list of 1-5, got {spec!r}")
    return values
