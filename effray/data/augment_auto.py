"""RandAugment and TrivialAugmentWide as batch ops: a sub-op and a magnitude per image.

The sub-ops, their magnitude ranges and signs are torchvision's (``AUTO_MAGNITUDES``);
magnitude bin b of 31 gives value ``b/30 * max``. Each image gets its own sub-op, so a
batch is split by sub-op: on the host each group of images is gathered and transformed
alone; on a GPU every sub-op runs on the whole batch and each image keeps its own (a
gather would need the groups' sizes on the host, a sync per sub-op; the elementwise
work is cheaper there than the wait). The sub-ops are per image, so both give the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from effray.data.augment_image import (
    Tensor,
    affine,
    blend,
    gray,
    rand,
    randint,
    rotation,
    to_u8,
    warp,
)
from effray.data.augment_spec import Batch, Param, register

# sub-op -> (RandAugment max, TrivialAugmentWide max, signed), as torchvision. Translations
# are fractions of the image side (TA's 32 px on CIFAR = 1.0); posterize's value is bits
# dropped, solarize's is 255 - threshold.
AUTO_MAGNITUDES: dict[str, tuple[float, float, bool]] = {
    "identity": (0.0, 0.0, False),
    "autocontrast": (0.0, 0.0, False),
    "equalize": (0.0, 0.0, False),
    "rotate": (30.0, 135.0, True),
    "solarize": (255.0, 255.0, False),
    "color": (0.9, 0.99, True),
    "posterize": (4.0, 6.0, False),
    "contrast": (0.9, 0.99, True),
    "brightness": (0.9, 0.99, True),
    "sharpness": (0.9, 0.99, True),
    "shear_x": (0.3, 0.99, True),
    "shear_y": (0.3, 0.99, True),
    "translate_x": (150 / 331, 1.0, True),
    "translate_y": (150 / 331, 1.0, True),
}
MAGNITUDE_BINS = 31


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(1, 2), keepdim=True).float()
    hi = x.amax(dim=(1, 2), keepdim=True).float()
    flat = hi <= lo
    return to_u8((x - torch.where(flat, 0, lo)) * torch.where(flat, 1, 255 / torch.where(flat, 1, hi - lo)))


def _equalize(x: Tensor) -> Tensor:
    """Per-channel histogram equalisation with torchvision's LUT, all channels at once."""
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
    """PIL's SMOOTH kernel (1s around a 5, /13) on the interior; borders stay put."""
    f = x.float()
    h, w = f.shape[1:3]
    s = sum(f[:, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = f.clone()
    out[:, 1:-1, 1:-1] = ((s + 4 * f[:, 1:-1, 1:-1]) / 13).round()
    return out


def _geo(x: Tensor, v: Tensor, kind: str) -> Tensor:
    _, h, w, _ = x.shape
    if kind == "rotate":
        return warp(x, rotation(v, h, w))
    one, z = torch.ones_like(v), torch.zeros_like(v)
    mats = {
        # shears pivot on (-0.5, -0.5), the image's corner, as torchvision's do
        "shear_x": (one, v, v / 2, z, one, z),
        "shear_y": (one, z, z, v, one, v / 2),
        "translate_x": (one, z, -(v * w).round(), z, one, z),
        "translate_y": (one, z, z, z, one, -(v * h).round()),
    }[kind]
    return warp(x, affine(*mats))


def _col(v: Tensor) -> Tensor:
    return v.float().view(-1, 1, 1, 1)


SUB_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": lambda x, v: x,
    "autocontrast": lambda x, v: _autocontrast(x),
    "equalize": lambda x, v: _equalize(x),
    "solarize": lambda x, v: torch.where(x >= 255 - _col(v), 255 - x, x),
    "posterize": lambda x, v: x & _col(256 - 2 ** v.round()).to(torch.uint8),
    "color": lambda x, v: to_u8(blend(x.float(), gray(x.float()), 1 + v)),
    "contrast": lambda x, v: to_u8(blend(x.float(), gray(x.float()).mean(dim=(1, 2, 3), keepdim=True), 1 + v)),
    "brightness": lambda x, v: to_u8(blend(x.float(), 0.0, 1 + v)),
    "sharpness": lambda x, v: to_u8(blend(x.float(), _sharpen_base(x), 1 + v)),
    "rotate": lambda x, v: _geo(x, v, "rotate"),
    "shear_x": lambda x, v: _geo(x, v, "shear_x"),
    "shear_y": lambda x, v: _geo(x, v, "shear_y"),
    "translate_x": lambda x, v: _geo(x, v, "translate_x"),
    "translate_y": lambda x, v: _geo(x, v, "translate_y"),
}


def apply_sub_ops(images: Tensor, choice: Tensor, values: Tensor, grouped: bool | None = None) -> Tensor:
    """Apply sub-op ``choice[i]`` (index into AUTO_MAGNITUDES) with value ``values[i]`` to
    image i. ``grouped`` (default: on the host) runs each sub-op on its own images only;
    otherwise every sub-op runs on the whole batch and a select keeps each image's own."""
    if grouped if grouped is not None else images.device.type == "cpu":
        out = images.clone()
        for k, name in enumerate(AUTO_MAGNITUDES):
            sel = (choice == k).nonzero().view(-1)
            if len(sel):
                out.index_copy_(0, sel, SUB_OPS[name](images.index_select(0, sel), values.index_select(0, sel)))
        return out
    out = images
    for k, name in enumerate(AUTO_MAGNITUDES):
        picked = (choice == k).view(-1, *([1] * (images.dim() - 1)))
        out = torch.where(picked, SUB_OPS[name](images, values), out)
    return out


def auto_values(choice: Tensor, bins: Tensor, sign: Tensor, wide: bool) -> Tensor:
    """Signed sub-op values from magnitude bins (0..30), per image."""
    # each image's sub-op magnitude and sign rule, selected with scalars on the device (a
    # lookup table would be a host-to-device copy per call)
    mx = torch.zeros(choice.shape, device=choice.device)
    signed = torch.zeros(choice.shape, dtype=torch.bool, device=choice.device)
    for k, m in enumerate(AUTO_MAGNITUDES.values()):
        mx = torch.where(choice == k, float(m[int(wide)]), mx)
        signed = signed | ((choice == k) & bool(m[2]))
    return bins.float() / (MAGNITUDE_BINS - 1) * mx * torch.where(signed, sign, 1.0)


def _sign(g: torch.Generator, n: int) -> Tensor:
    return torch.where(rand(g, n) < 0.5, -1.0, 1.0)


@register("randaugment", Param("n", int, 2, 0, 10), Param("m", int, 9, 0, MAGNITUDE_BINS - 1))
def randaugment(batch: Batch, g: torch.Generator, n: int = 2, m: int = 9) -> Batch:
    """RandAugment: n rounds, each applying a uniformly chosen sub-op at magnitude m/30."""
    img = batch["image"]
    for _ in range(n):
        choice = randint(g, len(AUTO_MAGNITUDES), len(img))
        bins = torch.full((len(img),), m, device=img.device)
        img = apply_sub_ops(img, choice, auto_values(choice, bins, _sign(g, len(img)), wide=False))
    return {**batch, "image": img}


@register("trivialaugment")
def trivialaugment(batch: Batch, g: torch.Generator) -> Batch:
    """TrivialAugmentWide: one sub-op per image at a uniformly random magnitude bin."""
    img = batch["image"]
    choice = randint(g, len(AUTO_MAGNITUDES), len(img))
    bins = randint(g, MAGNITUDE_BINS, len(img))
    return {**batch, "image": apply_sub_ops(img, choice, auto_values(choice, bins, _sign(g, len(img)), wide=True))}
