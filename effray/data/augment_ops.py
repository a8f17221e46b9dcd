"""The augmentation ops: pure batch functions ``op(batch, generator, **params) -> batch``.

A batch is a dict of tensors, ``"image"`` uint8 NHWC, on any device; the generator is
on the same device and every op draws from it in a fixed order, so a batch and a seed
give the same output wherever they run. Ops return a new dict and never write their
inputs (Ray hands out read-only memory). Each is declared with :func:`register`, which
puts it and its parameters in the table the policy parser reads. An op declared
``keyed`` (``altflip``) also gets the seed and epoch and draws per row from ``(seed, row
index)`` instead of the generator, so a row is treated alike in any batch.

Nothing reads a value back to the host, except where the batch already lives there
(the mixers' label check): the same code runs in Ray Data tasks and on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from effray.data.augment_image import (
    Tensor,
    adjust_colour,
    affine,
    gather_pixels,
    gray,
    index_dtype,
    rand,
    randint,
    reflect,
    rotation,
    row_offsets,
    to_u8,
    uniform,
    warp,
    warp_nearest,
)
from effray.data.augment_spec import PAIR, Batch, Param, ordered, register
from effray.errors import EffrayError

# ------------------------------------------------------------------ pixel-copying geometry


@register("crop", Param("padding", int, 4, 0, 64))
def crop(batch: Batch, g: torch.Generator, padding: int = 4) -> Batch:
    """Random crop of the reflect-padded image back to HxW (airbench's batch_crop)."""
    return crop_flip(batch, g, {"padding": padding}, None)


@register("flip", Param("p", float, 0.5, 0, 1))
def flip(batch: Batch, g: torch.Generator, p: float = 0.5) -> Batch:
    """Horizontal mirror of each image with probability p."""
    img = batch["image"]
    return {**batch, "image": mirror(img, rand(g, len(img)) < p)}


def mirror(images: Tensor, hit: Tensor) -> Tensor:
    """The images with rows ``hit`` (N,) bool mirrored left to right."""
    n, h, w, _ = images.shape
    cols = torch.arange(w, dtype=index_dtype(n, h, w), device=images.device)
    cols = torch.where(hit.view(-1, 1), cols.flip(0), cols)  # (N, W)
    rows = (torch.arange(h, dtype=cols.dtype, device=images.device) * w).view(1, -1, 1)
    return gather_pixels(images, rows + cols[:, None, :] + row_offsets(n, h, w, images.device))


def row_key(index: Any, synthetic: Any = None) -> Any:
    """Each row's identity across epochs and ranks, from int64 ``index`` and 0/1
    ``synthetic`` (tensors, arrays or ints alike): its index, synthetic rows (which number
    their own) moved past every real one."""
    return index if synthetic is None else index + synthetic * (1 << 40)


def row_keys(batch: Batch) -> Tensor:
    """:func:`row_key` of every row of a batch."""
    synthetic = batch["synthetic"].to(torch.int64) if "synthetic" in batch else None
    return row_key(batch["index"].to(torch.int64), synthetic)


def row_bits(keys: Any, seed: int) -> Any:
    """One pseudo-random bit per row key (int64 tensor or array): a 31-bit integer hash of
    (seed, key), all in non-negative int64 so nothing overflows."""
    mask = 0x7FFFFFFF
    h = (keys ^ (keys >> 31) ^ ((int(seed) * 0x9E3779B1) & mask)) & mask
    for _ in range(2):
        h = (h * 0x045D9F3B) & mask
        h = h ^ (h >> 16)
    return (h >> 11) & 1


def alternating_hits(batch: Batch, seed: int, epoch: int) -> Tensor:
    """altflip's rows to mirror: a bit of (seed, row key), inverted on odd epochs."""
    return (row_bits(row_keys(batch), seed) ^ (int(epoch) & 1)).bool()


@register("altflip", keyed=True)
def altflip(batch: Batch, g: torch.Generator, seed: int = 0, epoch: int = 0) -> Batch:
    """airbench's alternating flip: each image mirrored at random in epoch 0 (a bit of
    (seed, row index)) and then on every other epoch, so over two epochs every image is
    seen both ways (plain ``flip`` leaves a quarter of them one way only)."""
    return {**batch, "image": mirror(batch["image"], alternating_hits(batch, seed, epoch))}


@register("rotate", Param("degrees", float, 10.0, 0, 180), Param("bilinear", int, 0, 0, 1))
def rotate(batch: Batch, g: torch.Generator, degrees: float = 10.0, bilinear: int = 0) -> Batch:
    """Rotation by U(-degrees, degrees) about the centre, zero fill; nearest-neighbour, as
    torchvision's RandomRotation, unless ``bilinear=1`` (smoother, several times the cost)."""
    return flip_rotate(batch, g, None, {"degrees": degrees, "bilinear": bilinear})


# -- fused pairs: two geometric ops in one gather, drawing exactly what the pair draws in
# sequence (the policy uses them where the chain allows; tests hold them to the pair)


def crop_flip(
    batch: Batch, g: torch.Generator, crop_params: dict[str, Any], flip_params: dict[str, Any] | None
) -> Batch:
    """``crop`` then (unless None) ``flip``: the flip reverses the crop's column index."""
    return _crop(batch, g, crop_params["padding"], (lambda n: rand(g, n) < flip_params["p"]) if flip_params else None)


def crop_altflip(batch: Batch, g: torch.Generator, crop_params: dict[str, Any], flip_params: dict[str, Any]) -> Batch:
    """``crop`` then ``altflip`` (airbench's pair)."""
    return _crop(batch, g, crop_params["padding"], lambda n: alternating_hits(batch, **flip_params))


def _crop(batch: Batch, g: torch.Generator, padding: int, hits: Callable[[int], Tensor] | None) -> Batch:
    """The crop's gather, mirroring the rows ``hits(n)`` draws after the crop's own draws."""
    img = batch["image"]
    n, h, w, _ = img.shape
    if padding >= min(h, w):
        raise EffrayError(f"crop(padding={padding}) needs images larger than {padding} px, got {h}x{w}")
    dev, dtype = img.device, index_dtype(n, h, w)
    dy, dx = (randint(g, 2 * padding + 1, n) - padding for _ in range(2))
    rows = reflect(dy[:, None] + torch.arange(h, device=dev), h).to(dtype)
    cols = reflect(dx[:, None] + torch.arange(w, device=dev), w).to(dtype)
    if hits is not None:
        cols = torch.where(hits(n).view(-1, 1), cols.flip(1), cols)
    index = (rows * w + row_offsets(n, h, w, dev)[:, :, 0])[:, :, None] + cols[:, None, :]
    return {**batch, "image": gather_pixels(img, index)}


def flip_rotate(
    batch: Batch, g: torch.Generator, flip_params: dict[str, Any] | None, rotate_params: dict[str, Any]
) -> Batch | None:
    """(unless None) ``flip`` then ``rotate``: nearest rotation mirrors its source index;
    None when the rotation is bilinear (no exact fusion: the pair runs in turn)."""
    img = batch["image"]
    if rotate_params["bilinear"] and flip_params is not None:
        return None
    hit = rand(g, len(img)) < flip_params["p"] if flip_params is not None else None
    degrees = rotate_params["degrees"]
    mats = rotation(uniform(g, -degrees, degrees, len(img)), *img.shape[1:3])
    return {**batch, "image": warp(img, mats) if rotate_params["bilinear"] else warp_nearest(img, mats, hit)}


FUSED_PAIRS: dict[tuple[str, str], Callable[..., Batch | None]] = {
    ("crop", "flip"): crop_flip,
    ("crop", "altflip"): crop_altflip,
    ("flip", "rotate"): flip_rotate,
}

# ------------------------------------------------------------------ interpolating geometry


@register(
    "resized_crop",
    Param("min_scale", float, 0.35, 0.01, 1),
    Param("max_scale", float, 1.0, 0.01, 1),
    Param("ratio", PAIR, (3 / 4, 4 / 3), 0.1, 10),
    check=ordered("min_scale", "max_scale"),
)
def resized_crop(
    batch: Batch,
    g: torch.Generator,
    min_scale: float = 0.35,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Batch:
    """Inception-style crop: area fraction and log-aspect uniform, resized back to HxW.
    Boxes that would not fit are clipped to the image (torchvision retries instead)."""
    img = batch["image"]
    n, h, w, _ = img.shape
    area = uniform(g, min_scale, max_scale, n)
    aspect = torch.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1]), n))
    cw = torch.clamp(torch.sqrt(area * aspect) * w, max=w)
    ch = torch.clamp(torch.sqrt(area / aspect) * h, max=h)
    x0, y0 = rand(g, n) * (w - cw), rand(g, n) * (h - ch)
    sx, sy, z = cw / w, ch / h, torch.zeros_like(cw)
    mats = affine(sx, z, x0 + 0.5 * sx - 0.5, z, sy, y0 + 0.5 * sy - 0.5)
    return {**batch, "image": warp(img, mats, border=True)}


@register("scale", Param("min", float, 0.9, 0.1, 10), Param("max", float, 1.1, 0.1, 10), check=ordered("min", "max"))
def scale(batch: Batch, g: torch.Generator, min: float = 0.9, max: float = 1.1) -> Batch:  # noqa: A002
    """Zoom about the centre by U(min, max); zooming out fills with zero."""
    img = batch["image"]
    _, h, w, _ = img.shape
    inv = 1 / uniform(g, min, max, len(img))
    z = torch.zeros_like(inv)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return {**batch, "image": warp(img, affine(inv, z, cx - inv * cx, z, inv, cy - inv * cy))}


# ------------------------------------------------------------------ colour and noise


@register(
    "jitter",
    Param("brightness", float, 0.4, 0, 5),
    Param("contrast", float, 0.4, 0, 5),
    Param("saturation", float, 0.4, 0, 5),
    Param("hue", float, 0.1, 0, 0.5),
)
def jitter(
    batch: Batch,
    g: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> Batch:
    """ColorJitter: factors U(max(0,1-s), 1+s), hue shift U(-hue, hue) turns of the wheel.
    Order is fixed (brightness, contrast, saturation, hue), not shuffled per call."""
    n = len(batch["image"])
    f = [uniform(g, max(0.0, 1 - s), 1 + s, n) for s in (brightness, contrast, saturation)]
    h = uniform(g, -hue, hue, n)
    return {**batch, "image": adjust_colour(batch["image"], *f, h if hue > 0 else None)}


@register("grayscale", Param("p", float, 0.2, 0, 1))
def grayscale(batch: Batch, g: torch.Generator, p: float = 0.2) -> Batch:
    """Replace an image by its luma in every channel with probability p (keeps C)."""
    img = batch["image"]
    hit = rand(g, len(img)) < p
    return {**batch, "image": torch.where(hit.view(-1, 1, 1, 1), to_u8(gray(img.float())).expand_as(img), img)}


@register("noise", Param("std", float, 0.05, 0, 1))
def noise(batch: Batch, g: torch.Generator, std: float = 0.05) -> Batch:
    """Additive Gaussian noise, std as a fraction of 255."""
    img = batch["image"]
    z = torch.randn(img.shape, generator=g, device=g.device)
    return {**batch, "image": to_u8(z.mul_(std * 255).add_(img))}


@register("cutout", Param("size", int, 8, 0, 256))
def cutout(batch: Batch, g: torch.Generator, size: int = 8) -> Batch:
    """Zero one size x size square per image, centre uniform in the image, clipped at borders."""
    img = batch["image"]
    n, h, w, _ = img.shape
    dev = img.device
    y0 = (randint(g, h, n) - size // 2).view(-1, 1, 1)
    x0 = (randint(g, w, n) - size // 2).view(-1, 1, 1)
    ys, xs = torch.arange(h, device=dev).view(1, -1, 1), torch.arange(w, device=dev).view(1, 1, -1)
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return {**batch, "image": img.masked_fill(hole.unsqueeze(-1), 0)}


# ------------------------------------------------------------------ label mixing


def soft_target(batch: Batch, num_classes: int) -> Tensor:
    """The batch's soft labels: its "target" if a mix already made one, else one-hot labels."""
    if "target" in batch:
        return batch["target"].float()
    label = batch["label"].long()
    # checked where the labels are on the host; on a GPU it would be a sync per batch
    if label.device.type == "cpu" and len(label) and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise EffrayError(
            f"labels must be in [0, {num_classes}) to mix them, got {int(label.min())}..{int(label.max())}"
        )
    return F.one_hot(label, num_classes).float()


def _gamma(g: torch.Generator, a: float) -> Tensor:
    """One Gamma(a) draw from the generator, on its device, without a host sync:
    Marsaglia-Tsang over 16 candidates (each accepted with p > 0.95), boosted for a < 1."""
    d = (a + 1 if a < 1 else a) - 1 / 3
    c = 1 / math.sqrt(9 * d)
    x = torch.randn(16, generator=g, device=g.device)
    u = rand(g, 16)
    v = (1 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-12)))
    out = d * v.gather(0, ok.int().argmax().view(1))[0]  # a gather: a tensor index would read it on the host
    return out * rand(g, 1)[0] ** (1 / a) if a < 1 else out


def _beta(g: torch.Generator, alpha: float) -> Tensor:
    if alpha <= 0:
        return torch.ones((), device=g.device)
    x, y = _gamma(g, alpha), _gamma(g, alpha)
    return x / (x + y)


@register("mixup", Param("alpha", float, 0.2, 0, 100), mixes_labels=True)
def mixup(batch: Batch, g: torch.Generator, alpha: float = 0.2, num_classes: int = 10) -> Batch:
    """Mix each image with a random partner: lam ~ Beta(alpha, alpha), one lam per batch."""
    img = batch["image"]
    lam, perm = _beta(g, alpha), torch.randperm(len(img), generator=g, device=g.device)
    target = soft_target(batch, num_classes)
    x = img.float()
    mixed = torch.lerp(x.index_select(0, perm), x, lam)  # lam*x + (1-lam)*partner, in one pass
    return {**batch, "image": to_u8(mixed), "target": torch.lerp(target.index_select(0, perm), target, lam)}


@register("cutmix", Param("alpha", float, 1.0, 0, 100), mixes_labels=True)
def cutmix(batch: Batch, g: torch.Generator, alpha: float = 1.0, num_classes: int = 10) -> Batch:
    """Paste one box from a random partner (area 1-lam, lam ~ Beta); labels weighted by the
    pasted area after clipping to the image, so targets match pixels exactly."""
    img = batch["image"]
    n, h, w, _ = img.shape
    dev = img.device
    lam, perm = _beta(g, alpha), torch.randperm(n, generator=g, device=dev)
    bh, bw = (torch.floor(s * torch.sqrt(1 - lam)).long() for s in (h, w))
    cy, cx = randint(g, h, 1)[0], randint(g, w, 1)[0]
    y0, y1 = (cy - bh // 2).clamp(0, h), (cy - bh // 2 + bh).clamp(0, h)
    x0, x1 = (cx - bw // 2).clamp(0, w), (cx - bw // 2 + bw).clamp(0, w)
    ys, xs = torch.arange(h, device=dev).view(-1, 1), torch.arange(w, device=dev).view(1, -1)
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    lam = 1 - box.sum() / (h * w)
    target = soft_target(batch, num_classes)
    out = paste_box(img, perm, box, (y0, y1, x0, x1))
    return {**batch, "image": out, "target": torch.lerp(target.index_select(0, perm), target, lam)}


def paste_box(
    img: Tensor, perm: Tensor, box: Tensor, corners: tuple[Tensor, ...], by_slices: bool | None = None
) -> Tensor:
    """Each image with ``box`` (H,W bool; ``corners`` its top, bottom, left and right) taken
    from image ``perm[i]``. ``by_slices`` (default: on the host, where the corners cost
    nothing to read) copies the box alone; otherwise one select over the batch."""
    if by_slices if by_slices is not None else img.device.type == "cpu":
        top, bottom, left, right = (int(c) for c in corners)
        out = img.clone()
        out[:, top:bottom, left:right] = img[:, top:bottom, left:right].index_select(0, perm)
        return out
    # the select over (N, H, W*C) rows: a mask broadcast over the last dim is several times slower
    n, h, w, c = img.shape
    inside = box.repeat_interleave(c, 1).view(1, h, w * c)
    return torch.where(inside, img.index_select(0, perm).view(n, h, w * c), img.view(n, h, w * c)).view(img.shape)
