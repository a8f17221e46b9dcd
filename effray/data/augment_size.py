"""The ops that change an image's size: ``resize``, ``center_crop`` and ``random_resized_crop``.

Stored images may be larger than the model's input (Imagenette at 224 px for a 64 px
model), or of any size at all where a server or a batch job meets them. These ops turn a
batch into the model's size, as torchvision's ``Resize``, ``CenterCrop`` and
``RandomResizedCrop`` do to one image at a time:

- ``resize(S)``: the short side to ``S`` (antialiased bilinear, torch's own kernel: on the
  CPU its uint8 path, the one torchvision uses for uint8 tensors);
- ``center_crop(S)``: the centre ``S`` x ``S`` (zero-padded where the image is smaller);
- ``random_resized_crop(S, scale=(a, b))``: a box of a random area fraction and aspect per
  image, drawn exactly as torchvision draws it (ten tries, then the centre), resampled to
  ``S`` x ``S`` with the same antialiased bilinear filter. Each image has its own box, so
  the filter's taps are gathered per output row and column (:func:`resample`): no host
  read, the same code on a Ray Data task's CPU and on the training GPU.

``resize`` and ``center_crop`` draw nothing: they are a model's preprocessing, applied
alike to its validation rows, to exported models' parity data and to the images
``effray predict`` and ``effray serve`` receive (:func:`effray.data.augment.preprocess`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from effray.data.augment_image import Tensor, rand, to_u8, uniform
from effray.data.augment_spec import PAIR, Batch, Param, register

TRIES = 10  # torchvision's RandomResizedCrop draws this many boxes before it falls back to the centre


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the short side scaled to ``size``, as torchvision's ``Resize(size)``
    (the long side truncated, not rounded)."""
    if h <= w:
        return size, max(1, int(size * w / h))
    return max(1, int(size * h / w)), size


def _resize_shape(params: dict, h: int, w: int) -> tuple[int, int]:
    return resized_shape(h, w, params["size"])


def _crop_shape(params: dict, h: int, w: int) -> tuple[int, int]:
    return params["size"], params["width"] or params["size"]


@register("resize", Param("size", int, 224, 1, 4096), resizes=_resize_shape, random=False)
def resize(batch: Batch, g: torch.Generator, size: int = 224) -> Batch:
    """The short side to ``size``, the aspect kept: antialiased bilinear, as torchvision's
    ``Resize(size)`` on uint8 tensors. An image already that size comes back as it is."""
    img = batch["image"]
    n, h, w, _ = img.shape
    out_h, out_w = resized_shape(h, w, size)
    if (out_h, out_w) == (h, w):
        return dict(batch)
    if n == 0:
        return {**batch, "image": img.new_zeros((0, out_h, out_w, img.shape[3]))}
    x = img.permute(0, 3, 1, 2)  # a channels-last view: the layout torch's uint8 kernel runs fastest on
    if img.device.type == "cpu":  # torch's uint8 antialias path (exact integer arithmetic, ~10x float's speed)
        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    else:
        y = to_u8(F.interpolate(x.float(), size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False))
    return {**batch, "image": y.permute(0, 2, 3, 1).contiguous()}


@register(
    "center_crop",
    Param("size", int, 224, 1, 4096),
    Param("width", int, 0, 0, 4096),
    resizes=_crop_shape,
    random=False,
)
def center_crop(batch: Batch, g: torch.Generator, size: int = 224, width: int = 0) -> Batch:
    """The centre ``size`` x ``width`` (``width`` 0: square) of each image, as torchvision's
    ``CenterCrop``: offsets rounded, zero padding where the image is smaller."""
    img = batch["image"]
    _, h, w, _ = img.shape
    out_h, out_w = size, width or size
    if (out_h, out_w) == (h, w):
        return dict(batch)
    pad_h, pad_w = max(0, out_h - h), max(0, out_w - w)
    if pad_h or pad_w:  # torchvision pads (left/top the smaller half) and then crops
        img = F.pad(img, (0, 0, pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = img.shape[1:3]
    top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
    return {**batch, "image": img[:, top : top + out_h, left : left + out_w].contiguous()}


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """One HWC uint8 image of any size as ``resize(size)|center_crop(size)`` makes it (``data
    prepare --image-size``, before any cache): the short side to ``size``, the centre kept."""
    batch = resize({"image": torch.from_numpy(np.ascontiguousarray(image))[None]}, None, size=size)
    return center_crop(batch, None, size=size)["image"][0].numpy()


def _square(params: dict, h: int, w: int) -> tuple[int, int]:
    return params["size"], params["size"]


@register(
    "random_resized_crop",
    Param("size", int, 224, 1, 4096),
    Param("scale", PAIR, (0.08, 1.0), 0.001, 1),
    Param("ratio", PAIR, (3 / 4, 4 / 3), 0.1, 10),
    resizes=_square,
)
def random_resized_crop(
    batch: Batch,
    g: torch.Generator,
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Batch:
    """ImageNet's training crop (torchvision's ``RandomResizedCrop(size, scale, ratio)``): a
    box of area fraction U(scale) and log-aspect U(log ratio), drawn up to ten times per
    image until it fits (else the centre, its aspect clamped to ``ratio``), placed
    uniformly, then resampled to ``size`` x ``size`` (antialiased bilinear)."""
    img = batch["image"]
    n, h, w, _ = img.shape
    top, left, bh, bw = crop_boxes(g, n, h, w, scale, ratio)
    return {**batch, "image": resample(img, top, left, bh, bw, size, size)}


def crop_boxes(
    g: torch.Generator, n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, height, width) int64 (N,) of torchvision's ``RandomResizedCrop.get_params``
    for every image at once: its ten tries drawn together, the first that fits kept (an
    argmax over the tries, not a host read), the centre box where none fits."""
    area = uniform(g, scale[0], scale[1], n * TRIES).view(n, TRIES) * (h * w)
    aspect = torch.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1]), n * TRIES).view(n, TRIES))
    cw = torch.sqrt(area * aspect).round_().long()  # round half to even, as Python's round()
    ch = torch.sqrt(area / aspect).round_().long()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    top = (rand(g, n) * (h - ch + 1)).long().clamp_(max=h - 1)
    left = (rand(g, n) * (w - cw + 1)).long().clamp_(max=w - 1)
    # the fallback: the whole image, its aspect clamped into ``ratio``, centred (host ints: shapes)
    fw, fh = w, h
    if w / h < ratio[0]:
        fh = int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        fw = int(round(h * ratio[1]))
    pick = lambda a, b: torch.where(found, a, b)  # noqa: E731
    return pick(top, (h - fh) // 2), pick(left, (w - fw) // 2), pick(ch, fh), pick(cw, fw)


def taps(start: Tensor, length: Tensor, out: int, size: int) -> tuple[Tensor, Tensor]:
    """Antialiased bilinear taps of resampling ``[start, start + length)`` (N,) of an axis of
    ``size`` pixels to ``out`` pixels: ``(index (N, out, K), weight (N, out, K))``, the
    triangle filter widened by the downscale factor and renormalised over the pixels inside
    the box, as torch's ``interpolate(antialias=True)`` on the cropped image. ``K`` covers the
    widest filter a box within the axis can need."""
    k = math.ceil(2 * max(size / out, 1.0)) + 1  # a window of 2 x support holds at most this many pixels
    dev = start.device
    scale = (length.float() / out).view(-1, 1)
    support = scale.clamp(min=1.0)
    start_f = start.float().view(-1, 1)
    centre = scale * (torch.arange(out, device=dev, dtype=torch.float32) + 0.5)  # in box coordinates
    first = torch.floor(centre - support + 0.5)
    rel = first.unsqueeze(-1) + torch.arange(k, device=dev, dtype=torch.float32)  # (N, out, K)
    weight = (1 - ((rel + 0.5 - centre.unsqueeze(-1)) / support.unsqueeze(-1)).abs()).clamp_(min=0)
    weight = weight * ((rel >= 0) & (rel < length.float().view(-1, 1, 1)))
    weight = weight / weight.sum(-1, keepdim=True).clamp_(min=1e-12)
    index = (rel + start_f.unsqueeze(-1)).clamp_(0, size - 1).long()
    return index, weight


def resample(img: Tensor, top: Tensor, left: Tensor, bh: Tensor, bw: Tensor, out_h: int, out_w: int) -> Tensor:
    """Each image's box ``(top, left, bh, bw)`` (N,) resampled to ``out_h`` x ``out_w``
    (uint8 NHWC), rows then columns, each a sum of ``K`` row gathers weighted per output
    pixel: the cost of the filter's taps, not of a dense (out x in) matrix per image."""
    n, h, w, c = img.shape
    if n == 0:
        return img.new_zeros((0, out_h, out_w, c))
    rows_i, rows_w = taps(top, bh, out_h, h)  # (N, out_h, K)
    cols_i, cols_w = taps(left, bw, out_w, w)  # (N, out_w, K)
    base = torch.arange(n, device=img.device).view(-1, 1)
    flat = img.reshape(n * h, w * c).float()  # once: each row is read by several taps
    tmp = torch.zeros((n * out_h, w * c), dtype=torch.float32, device=img.device)
    for k in range(rows_i.shape[-1]):
        tmp.addcmul_(flat.index_select(0, (rows_i[..., k] + base * h).reshape(-1)), rows_w[..., k].reshape(-1, 1))
    by_col = tmp.view(n, out_h, w, c).transpose(1, 2).reshape(n * w, out_h * c)  # columns as rows
    out = torch.zeros((n * out_w, out_h * c), dtype=torch.float32, device=img.device)
    for k in range(cols_i.shape[-1]):
        out.addcmul_(by_col.index_select(0, (cols_i[..., k] + base * w).reshape(-1)), cols_w[..., k].reshape(-1, 1))
    return to_u8(out.view(n, out_w, out_h, c).transpose(1, 2)).contiguous()
