"""The augmentation ops for torch tensors, so ``--augment-on gpu`` runs them on the device.

Same op names, parameters and policy text as :mod:`effray.data.augment` (parsed by the
same :func:`~effray.data.augment.parse_ops`); only the implementations differ. A batch
is a dict of tensors with ``"image"`` uint8 **NHWC** (the numpy layout, so both backends
agree), and randomness comes from a ``torch.Generator`` on the images' device. Geometric
ops use ``affine_grid``/``grid_sample`` with the numpy backend's pixel convention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from effray.data.augment import (
    AUTO_MAGNITUDES,
    MAGNITUDE_BINS,
    PolicyBase,
    _check_classes,
    _stats,
    batch_rng,
    parse_ops,
)
from effray.data.augment_ops import OPS, row_bits, row_key
from effray.errors import EffrayError

TBatch = dict[str, Any]
Tensor = torch.Tensor
TORCH_OPS: dict[str, Callable[..., TBatch]] = {}


def torch_op(name: str) -> Callable:
    """Register the torch twin of a declared op (its parameters come from the numpy spec)."""
    OPS.get(name)

    def deco(fn: Callable[..., TBatch]) -> Callable[..., TBatch]:
        TORCH_OPS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------ helpers


def _rand(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g, device=g.device)


def _uniform(g: torch.Generator, lo: float, hi: float, n: int) -> Tensor:
    return lo + (hi - lo) * _rand(g, n)


def _randint(g: torch.Generator, high: int, n: int) -> Tensor:
    return torch.randint(0, high, (n,), generator=g, device=g.device)


def _to_u8(x: Tensor) -> Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _gray(x: Tensor) -> Tensor:
    if x.shape[-1] == 1:
        return x
    # Python-scalar weights: a weight tensor would be a host-to-device copy per call
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def _blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    f = factor.float().view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 255)


def _rows(*entries: Tensor) -> Tensor:
    """(N,2,3) matrices from six per-image entries, row-major."""
    return torch.stack(entries, -1).float().view(-1, 2, 3)


def _warp(images: Tensor, mats: Tensor, border: bool = False, mode: str = "bilinear") -> Tensor:
    """Affine warp (``mode`` bilinear or nearest) of a uint8 NHWC batch; mats (N,2,3) map
    output pixels to source pixels (as the numpy ``_warp``), converted to grid_sample's
    [-1, 1] coordinates."""
    n, h, w, c = images.shape
    if n == 0:  # affine_grid rejects empty batches
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
        mode=mode,
        padding_mode="border" if border else "zeros",
        align_corners=True,
    )
    return _to_u8(out).permute(0, 2, 3, 1).contiguous()


def _rotation(deg: Tensor, h: int, w: int) -> Tensor:
    t = torch.deg2rad(deg.float())
    c, s = torch.cos(t), torch.sin(t)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _rows(c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(-1)
    v, mn = x.amax(-1), x.amin(-1)
    d = v - mn
    s = d / torch.where(v > 0, v, 1)
    sd = torch.where(d > 0, d, 1)
    rc, gc, bc = (v - r) / sd, (v - g) / sd, (v - b) / sd
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))
    return torch.where(d > 0, (h / 6) % 1.0, 0), s, v


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = (i.long() % 6).unsqueeze(-1)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c, -1).gather(-1, i).squeeze(-1)  # noqa: E731
    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)


def adjust_colour(images: Tensor, bright: Tensor, contrast: Tensor, sat: Tensor, hue: Tensor | None) -> Tensor:
    """Torch twin of :func:`effray.data.augment_ops.adjust_colour`."""
    x = _blend(images.float(), 0.0, bright)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
    if x.shape[-1] == 3:
        x = _blend(x, _gray(x), sat)
        if hue is not None:
            h, s, v = _rgb_to_hsv(x / 255)
            x = _hsv_to_rgb((h + hue.float().view(-1, 1, 1)) % 1.0, s, v) * 255
    return _to_u8(x)


# ------------------------------------------------------------------ ops


@torch_op("crop")
def crop(batch: TBatch, g: torch.Generator, padding: int = 4) -> TBatch:
    img = batch["image"]
    n, h, w, _ = img.shape
    if padding >= min(h, w):
        raise EffrayError(f"crop(padding={padding}) needs images larger than {padding} px, got {h}x{w}")
    dev = img.device
    dy, dx = (_randint(g, 2 * padding + 1, n) - padding for _ in range(2))
    rows = _reflect(dy[:, None] + torch.arange(h, device=dev), h)
    cols = _reflect(dx[:, None] + torch.arange(w, device=dev), w)
    return {
        **batch,
        "image": img[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]],
    }


def _reflect(i: Tensor, size: int) -> Tensor:
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


@torch_op("flip")
def flip(batch: TBatch, g: torch.Generator, p: float = 0.5) -> TBatch:
    img = batch["image"]
    hit = _rand(g, len(img)) < p
    return {**batch, "image": torch.where(hit.view(-1, 1, 1, 1), img.flip(2), img)}


@torch_op("altflip")
def altflip(batch: TBatch, g: torch.Generator, seed: int = 0, epoch: int = 0) -> TBatch:
    img = batch["image"]
    keys = row_key(batch["index"].to(torch.int64), batch["synthetic"].to(torch.int64) if "synthetic" in batch else None)
    hit = (row_bits(keys, seed) ^ (int(epoch) & 1)).bool()
    return {**batch, "image": torch.where(hit.view(-1, 1, 1, 1), img.flip(2), img)}


@torch_op("rotate")
def rotate(batch: TBatch, g: torch.Generator, degrees: float = 10.0, bilinear: int = 0) -> TBatch:
    img = batch["image"]
    mats = _rotation(_uniform(g, -degrees, degrees, len(img)), *img.shape[1:3])
    return {**batch, "image": _warp(img, mats, mode="bilinear" if bilinear else "nearest")}


@torch_op("resized_crop")
def resized_crop(
    batch: TBatch,
    g: torch.Generator,
    min_scale: float = 0.35,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> TBatch:
    img = batch["image"]
    n, h, w, _ = img.shape
    area = _uniform(g, min_scale, max_scale, n)
    aspect = torch.exp(_uniform(g, float(np.log(ratio[0])), float(np.log(ratio[1])), n))
    cw = torch.clamp(torch.sqrt(area * aspect) * w, max=w)
    ch = torch.clamp(torch.sqrt(area / aspect) * h, max=h)
    x0, y0 = _rand(g, n) * (w - cw), _rand(g, n) * (h - ch)
    sx, sy, z = cw / w, ch / h, torch.zeros_like(cw)
    mats = _rows(sx, z, x0 + 0.5 * sx - 0.5, z, sy, y0 + 0.5 * sy - 0.5)
    return {**batch, "image": _warp(img, mats, border=True)}


@torch_op("scale")
def scale(batch: TBatch, g: torch.Generator, min: float = 0.9, max: float = 1.1) -> TBatch:  # noqa: A002
    img = batch["image"]
    _, h, w, _ = img.shape
    inv = 1 / _uniform(g, min, max, len(img))
    z = torch.zeros_like(inv)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return {**batch, "image": _warp(img, _rows(inv, z, cx - inv * cx, z, inv, cy - inv * cy))}


@torch_op("jitter")
def jitter(
    batch: TBatch,
    g: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> TBatch:
    n = len(batch["image"])
    f = [_uniform(g, max(0.0, 1 - s), 1 + s, n) for s in (brightness, contrast, saturation)]
    h = _uniform(g, -hue, hue, n)
    return {**batch, "image": adjust_colour(batch["image"], *f, h if hue > 0 else None)}


@torch_op("grayscale")
def grayscale(batch: TBatch, g: torch.Generator, p: float = 0.2) -> TBatch:
    img = batch["image"]
    hit = _rand(g, len(img)) < p
    gray = _to_u8(_gray(img.float())).expand_as(img)
    return {**batch, "image": torch.where(hit.view(-1, 1, 1, 1), gray, img)}


@torch_op("noise")
def noise(batch: TBatch, g: torch.Generator, std: float = 0.05) -> TBatch:
    img = batch["image"]
    z = torch.randn(img.shape, generator=g, device=g.device)
    return {**batch, "image": _to_u8(img.float() + z * (std * 255))}


@torch_op("cutout")
def cutout(batch: TBatch, g: torch.Generator, size: int = 8) -> TBatch:
    img = batch["image"]
    n, h, w, _ = img.shape
    dev = img.device
    y0 = (_randint(g, h, n) - size // 2).view(-1, 1, 1)
    x0 = (_randint(g, w, n) - size // 2).view(-1, 1, 1)
    ys, xs = torch.arange(h, device=dev).view(1, -1, 1), torch.arange(w, device=dev).view(1, 1, -1)
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return {**batch, "image": img.masked_fill(hole.unsqueeze(-1), 0)}


def soft_target(batch: TBatch, num_classes: int) -> Tensor:
    """The batch's soft labels: its "target" if already mixed, else one-hot labels."""
    if "target" in batch:
        return batch["target"].float()
    return F.one_hot(batch["label"].long(), num_classes).float()


def _gamma(g: torch.Generator, a: float) -> Tensor:
    """One Gamma(a) draw from the generator, on device, without a host sync: Marsaglia-Tsang
    over 16 candidates (each accepted with p > 0.95), boosted for a < 1."""
    d = (a + 1 if a < 1 else a) - 1 / 3
    c = float(1 / np.sqrt(9 * d))
    x = torch.randn(16, generator=g, device=g.device)
    u = _rand(g, 16)
    v = (1 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-12)))
    out = d * v.gather(0, ok.int().argmax().view(1))[0]  # a gather: a tensor index would read it on the host
    return out * _rand(g, 1)[0] ** (1 / a) if a < 1 else out


def _beta(g: torch.Generator, alpha: float) -> Tensor:
    if alpha <= 0:
        return torch.ones((), device=g.device)
    x, y = _gamma(g, alpha), _gamma(g, alpha)
    return x / (x + y)


@torch_op("mixup")
def mixup(batch: TBatch, g: torch.Generator, alpha: float = 0.2, num_classes: int = 10) -> TBatch:
    img = batch["image"]
    lam, perm = _beta(g, alpha), torch.randperm(len(img), generator=g, device=g.device)
    target = soft_target(batch, num_classes)
    mixed = lam * img.float() + (1 - lam) * img[perm].float()
    return {**batch, "image": _to_u8(mixed), "target": lam * target + (1 - lam) * target[perm]}


@torch_op("cutmix")
def cutmix(batch: TBatch, g: torch.Generator, alpha: float = 1.0, num_classes: int = 10) -> TBatch:
    img = batch["image"]
    n, h, w, _ = img.shape
    dev = img.device
    lam, perm = _beta(g, alpha), torch.randperm(n, generator=g, device=dev)
    bh, bw = (torch.floor(s * torch.sqrt(1 - lam)).long() for s in (h, w))
    cy, cx = _randint(g, h, 1)[0], _randint(g, w, 1)[0]
    y0, y1 = (cy - bh // 2).clamp(0, h), (cy - bh // 2 + bh).clamp(0, h)
    x0, x1 = (cx - bw // 2).clamp(0, w), (cx - bw // 2 + bw).clamp(0, w)
    ys, xs = torch.arange(h, device=dev).view(-1, 1), torch.arange(w, device=dev).view(1, -1)
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    lam = 1 - box.sum() / (h * w)
    target = soft_target(batch, num_classes)
    out = torch.where(box.view(1, h, w, 1), img[perm], img)
    return {**batch, "image": out, "target": lam * target + (1 - lam) * target[perm]}


# ------------------------------------------------------------------ RandAugment / TrivialAugment


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(1, 2), keepdim=True).float()
    hi = x.amax(dim=(1, 2), keepdim=True).float()
    flat = hi <= lo
    return _to_u8((x - torch.where(flat, 0, lo)) * torch.where(flat, 1, 255 / torch.where(flat, 1, hi - lo)))


def _equalize(x: Tensor) -> Tensor:
    n, h, w, c = x.shape
    dev = x.device
    flat = x.permute(0, 3, 1, 2).reshape(n * c, h * w).long()
    offset = 256 * torch.arange(n * c, device=dev)[:, None]
    # a fixed-size scatter-add, not bincount: bincount's size depends on the data's max (a host sync)
    index = (flat + offset).flatten()
    hist = torch.zeros(n * c * 256, dtype=torch.int64, device=dev).index_add_(0, index, torch.ones_like(index))
    hist = hist.view(n * c, 256)
    last = hist.gather(1, 255 - (hist.flip(1) > 0).int().argmax(1, keepdim=True))
    step = (h * w - last) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp_min(1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    lut = torch.where(step == 0, torch.arange(256, device=dev), lut)
    return lut.gather(1, flat).view(n, c, h, w).permute(0, 2, 3, 1).to(torch.uint8)


def _sharpen_base(x: Tensor) -> Tensor:
    f = x.float()
    h, w = f.shape[1:3]
    s = sum(f[:, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = f.clone()
    out[:, 1:-1, 1:-1] = ((s + 4 * f[:, 1:-1, 1:-1]) / 13).round()
    return out


def _geo(x: Tensor, v: Tensor, kind: str) -> Tensor:
    _, h, w, _ = x.shape
    if kind == "rotate":
        return _warp(x, _rotation(v, h, w))
    one, z = torch.ones_like(v), torch.zeros_like(v)
    mats = {
        # shears pivot on (-0.5, -0.5), the image's corner, as torchvision's do
        "shear_x": (one, v, v / 2, z, one, z),
        "shear_y": (one, z, z, v, one, v / 2),
        "translate_x": (one, z, -(v * w).round(), z, one, z),
        "translate_y": (one, z, z, z, one, -(v * h).round()),
    }[kind]
    return _warp(x, _rows(*mats))


def _col(v: Tensor) -> Tensor:
    return v.float().view(-1, 1, 1, 1)


SUB_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": lambda x, v: x,
    "autocontrast": lambda x, v: _autocontrast(x),
    "equalize": lambda x, v: _equalize(x),
    "solarize": lambda x, v: torch.where(x >= 255 - _col(v), 255 - x, x),
    "posterize": lambda x, v: x & _col(256 - 2 ** v.round()).to(torch.uint8),
    "color": lambda x, v: _to_u8(_blend(x.float(), _gray(x.float()), 1 + v)),
    "contrast": lambda x, v: _to_u8(_blend(x.float(), _gray(x.float()).mean(dim=(1, 2, 3), keepdim=True), 1 + v)),
    "brightness": lambda x, v: _to_u8(_blend(x.float(), 0.0, 1 + v)),
    "sharpness": lambda x, v: _to_u8(_blend(x.float(), _sharpen_base(x), 1 + v)),
    "rotate": lambda x, v: _geo(x, v, "rotate"),
    "shear_x": lambda x, v: _geo(x, v, "shear_x"),
    "shear_y": lambda x, v: _geo(x, v, "shear_y"),
    "translate_x": lambda x, v: _geo(x, v, "translate_x"),
    "translate_y": lambda x, v: _geo(x, v, "translate_y"),
}


def apply_sub_ops(images: Tensor, choice: Tensor, values: Tensor) -> Tensor:
    """Torch twin of :func:`effray.data.augment.apply_sub_ops`: every sub-op runs on the whole
    batch and each image keeps its chosen one. Gathering each sub-op's images first would
    need their indices on the host (a sync per sub-op); the ops are per-image, so the
    result is the same, and a GPU does the extra elementwise work faster than it waits."""
    out = images
    for k, name in enumerate(AUTO_MAGNITUDES):
        picked = (choice == k).view(-1, *([1] * (images.dim() - 1)))
        out = torch.where(picked, SUB_OPS[name](images, values), out)
    return out


def auto_values(choice: Tensor, bins: Tensor, sign: Tensor, wide: bool) -> Tensor:
    # each image's sub-op magnitude and sign rule, selected with scalars on the device (a
    # lookup table would be a host-to-device copy per call)
    mx = torch.zeros(choice.shape, device=choice.device)
    signed = torch.zeros(choice.shape, dtype=torch.bool, device=choice.device)
    for k, m in enumerate(AUTO_MAGNITUDES.values()):
        mx = torch.where(choice == k, float(m[int(wide)]), mx)
        signed = signed | ((choice == k) & bool(m[2]))
    return bins.float() / (MAGNITUDE_BINS - 1) * mx * torch.where(signed, sign, 1.0)


def _sign(g: torch.Generator, n: int) -> Tensor:
    return torch.where(_rand(g, n) < 0.5, -1.0, 1.0)


@torch_op("randaugment")
def randaugment(batch: TBatch, g: torch.Generator, n: int = 2, m: int = 9) -> TBatch:
    img = batch["image"]
    for _ in range(n):
        choice = _randint(g, len(AUTO_MAGNITUDES), len(img))
        bins = torch.full((len(img),), m, device=img.device)
        img = apply_sub_ops(img, choice, auto_values(choice, bins, _sign(g, len(img)), wide=False))
    return {**batch, "image": img}


@torch_op("trivialaugment")
def trivialaugment(batch: TBatch, g: torch.Generator) -> TBatch:
    img = batch["image"]
    choice = _randint(g, len(AUTO_MAGNITUDES), len(img))
    bins = _randint(g, MAGNITUDE_BINS, len(img))
    return {
        **batch,
        "image": apply_sub_ops(img, choice, auto_values(choice, bins, _sign(g, len(img)), wide=True)),
    }


# ------------------------------------------------------------------ policy


class TorchPolicy(PolicyBase):
    """A parsed chain of torch ops: ``policy(batch, generator) -> batch``."""

    def __call__(self, batch: TBatch, generator: torch.Generator, *, seed: int = 0, epoch: int = 0) -> TBatch:
        img = batch["image"]
        if img.dtype != torch.uint8 or img.dim() != 4 or img.shape[-1] not in (1, 3):
            raise EffrayError(f"augment expects uint8 NHWC images (C=1 or 3), got {img.dtype} {tuple(img.shape)}")
        if generator.device.type != img.device.type:
            raise EffrayError(
                f"the generator is on {generator.device}, the images on {img.device}; "
                "create the generator on the images' device"
            )
        out = dict(batch)
        for name, params in self.chain:
            out = TORCH_OPS[name](out, generator, **params, **self.extra(name, seed, epoch))
        return out


def parse_policy_torch(text: str, num_classes: int) -> TorchPolicy:
    """Parse policy text exactly as :func:`effray.data.augment.parse_policy` does, for the
    torch backend; an op without a torch version is an error naming the CPU fallback."""
    _check_classes(num_classes)
    chain = parse_ops(text)
    for name, _ in chain:
        if name not in TORCH_OPS:
            raise EffrayError(f"augment op {name} has no torch version; use --augment-on cpu for {text!r}")
    return TorchPolicy(chain, num_classes)


def batch_generator(seed: int, epoch: int, key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``batch_rng(seed, epoch, key)``: the same
    reproducibility rule as the numpy pipeline."""
    return new_generator(device).manual_seed(int(batch_rng(seed, epoch, key).integers(2**63)))


def new_generator(device: str | torch.device) -> torch.Generator:
    """A fresh generator on ``device`` (the seam the fake-CUDA tests replace: a real CUDA
    generator needs a driver)."""
    return torch.Generator(device=device)


def normalize_torch(
    images: Tensor,
    mean: Sequence[float] | float,
    std: Sequence[float] | float,
    channels_last: bool = False,
) -> Tensor:
    """uint8 NHWC tensor -> float32 (x/255 - mean)/std, NCHW unless channels_last: the numpy
    ``normalize`` on the device."""
    c = images.shape[-1]
    m, s = (torch.as_tensor(_stats(v, c, k).copy(), device=images.device) for v, k in ((mean, "mean"), (std, "std")))
    out = (images.float() * (1 / 255) - m) / s
    return out if channels_last else out.permute(0, 3, 1, 2).contiguous()
