"""What "near duplicate" means: synthetic copies of real images, and the threshold that
tells them from different images.

Two families of copies (:data:`KINDS`), each made from a seeded sample of train images:

- *light copies*, what a pipeline does to a file: ``crop``, 1-3 px cut from each side
  (independently) and resized back; ``flip``, the horizontal mirror; ``jpeg``, re-encoded
  at quality 75; ``crop+flip+jpeg``, all three;
- *re-shot copies*, what ciFAIR's human-checked CIFAR-10 pairs look like (the same object
  photographed again, re-cropped, shifted, scaled or re-coloured): ``recrop``, a crop at
  another scale and position (zoomed in 5-30 %, shifted up to 6 % of the side);
  ``rotate``, turned up to 8 degrees (and zoomed in just enough to hide the corners);
  ``colour``, saturation, contrast, brightness and each channel's gain moved; ``reshoot``,
  all of them at once. Each re-shot copy is mirrored with probability 1/2.

The threshold (:func:`choose_threshold`) is the score that best separates
``score(copy, its source)`` from ``score(image, its nearest other real image)`` over the
sample, with at most ``max_fpr`` of the real images above it, so the report can say what
it means: the share of each kind of copy it finds and the share of real images it flags.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

LIGHT = ("crop", "flip", "jpeg", "crop+flip+jpeg")
RESHOT = ("recrop", "rotate", "colour", "reshoot")
KINDS = LIGHT + RESHOT
CROP_PX = (1, 3)
JPEG_QUALITY = 75
DEFINITION = (
    f"a near duplicate is a copy of an image: a light copy (cut {CROP_PX[0]}-{CROP_PX[1]} px from each side and "
    f"resized back, mirrored, re-encoded as JPEG q{JPEG_QUALITY}, or all three) or a re-shot one (re-cropped at "
    "another scale and position, turned a few degrees, re-coloured, or all three; mirrored or not)"
)
# the re-shot copies' ranges: zoom in (scale), shift (a fraction of the half-side), turn (degrees)
RECROP = {"scale": (1.05, 1.3), "shift": 0.12, "turn": 0.0}
ROTATE = {"scale": (1.05, 1.12), "shift": 0.0, "turn": 8.0}
RESHOOT = {"scale": (1.0, 1.25), "shift": 0.1, "turn": 6.0}
COLOUR = {"saturation": 0.3, "contrast": 0.2, "brightness": 0.2, "gain": 0.06}


def crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    left, right, top, bottom = (int(v) for v in rng.integers(CROP_PX[0], CROP_PX[1] + 1, 4))
    cut = image[top : h - bottom, left : w - right]
    return _from_pil(Image.fromarray(_to_pil(cut)).resize((w, h), Image.BILINEAR), image.shape)


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_pil(image)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return _from_pil(Image.open(buf), image.shape)


def _to_pil(image: np.ndarray) -> np.ndarray:
    return image[:, :, 0] if image.shape[2] == 1 else image


def _from_pil(img: Any, shape: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(img.convert("L" if shape[2] == 1 else "RGB"), dtype=np.uint8)
    return out.reshape(shape)


OPS = {"crop": crop, "flip": flip, "jpeg": jpeg}


def light_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One light copy of a uint8 HWC image (``kind`` in :data:`KINDS`)."""
    for op in kind.split("+"):
        image = OPS[op](image, rng)
    return image


def light_copies(
    images: np.ndarray, kinds: tuple[str, ...] = LIGHT, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every light kind of copy of every image: ``(copies, source position, kind)``,
    reproducible from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0B1]))
    out, source, kind = [], [], []
    for i, im in enumerate(images):
        for k in kinds:
            out.append(light_copy(im, k, rng))
            source.append(i)
            kind.append(k)
    shape = (0, *images.shape[1:])
    return (
        (np.stack(out) if out else np.zeros(shape, np.uint8)),
        np.array(source, np.int64),
        np.array(kind, dtype=object),
    )


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def reshoot_geometry(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float], shift: float, turn: float):
    """Float NCHW images zoomed in by ``scale``, shifted by up to ``shift`` (of the half
    side) and turned by up to ``turn`` degrees, one affine resampling (borders reflected)."""
    n = len(x)
    s = _uniform(n, *scale, g)
    a = _uniform(n, -turn, turn, g) * math.pi / 180
    m = torch.zeros(n, 2, 3)
    m[:, 0, 0], m[:, 0, 1] = torch.cos(a) / s, -torch.sin(a) / s
    m[:, 1, 0], m[:, 1, 1] = torch.sin(a) / s, torch.cos(a) / s
    m[:, :, 2] = _uniform(2 * n, -shift, shift, g).view(n, 2)
    grid = F.affine_grid(m, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def recolour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Float NCHW images in [0, 1] with saturation, contrast, brightness and each channel's
    gain moved by up to :data:`COLOUR`'s fractions."""
    n, c = x.shape[:2]
    f = lambda r, *shape: 1 + _uniform(n * int(np.prod(shape or (1,))), -r, r, g).view(n, *(shape or (1,)))  # noqa: E731
    if c == 3:
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = grey + (x - grey) * f(COLOUR["saturation"]).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * f(COLOUR["contrast"]).view(n, 1, 1, 1)
    x = x * f(COLOUR["brightness"]).view(n, 1, 1, 1) * f(COLOUR["gain"], c).view(n, c, 1, 1)
    return x.clamp(0, 1)


def reshot_copies(images: np.ndarray, kind: str, g: torch.Generator) -> np.ndarray:
    """uint8 NHWC images -> one re-shot copy each (``kind`` in :data:`RESHOT`), mirrored
    with probability 1/2."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if kind in ("recrop", "rotate", "reshoot"):
        x = reshoot_geometry(x, g, **{"recrop": RECROP, "rotate": ROTATE, "reshoot": RESHOOT}[kind])
    if kind in ("colour", "reshoot"):
        x = recolour(x, g)
    mirror = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def synthetic_copies(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every kind of copy (:data:`KINDS`) of every image: ``(copies, source position,
    kind)``, reproducible from ``seed``."""
    copies, source, kinds = light_copies(images, seed=seed)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 0x5E5]).generate_state(1)[0]))
    parts, srcs, names = [copies], [source], [kinds]
    for k in RESHOT:
        if len(images):
            parts.append(reshot_copies(images, k, g))
            srcs.append(np.arange(len(images)))
            names.append(np.array([k] * len(images), dtype=object))
    return np.concatenate(parts), np.concatenate(srcs).astype(np.int64), np.concatenate(names)


MAX_FPR = 0.03


def choose_threshold(
    positives: np.ndarray, negatives: np.ndarray, max_fpr: float = MAX_FPR, trim_at: float | None = None
) -> dict[str, float]:
    """The threshold with the largest TPR - FPR among those that flag at most ``max_fpr`` of
    the real images (``score >= threshold`` is flagged; ties go to the highest), placed
    halfway to the next lower score. Near duplicates are rare and every real image is a
    candidate false positive, so the rate is capped: the unconstrained best TPR - FPR
    buys its last few points of recall by flagging many real images. Returns it with its
    TPR (copies found) and FPR (real images above it).

    A real image whose nearest other image scores at least ``trim_at`` (default: the
    median copy) has a near duplicate of its own in the data: it is no negative and is
    left out (``trimmed`` counts them), or a dataset full of copies would calibrate itself
    loose."""
    pos = np.sort(np.asarray(positives, np.float64))
    neg = np.asarray(negatives, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("choose_threshold needs positives and negatives")
    trim_at = float(np.median(pos)) if trim_at is None else float(trim_at)
    keep = neg < trim_at
    trimmed = int((~keep).sum())
    neg = np.sort(neg[keep]) if keep.any() else np.sort(neg)
    cands = np.unique(np.concatenate([pos, neg]))
    tpr = 1.0 - np.searchsorted(pos, cands, side="left") / len(pos)
    fpr = 1.0 - np.searchsorted(neg, cands, side="left") / len(neg)
    j = np.where(fpr <= max_fpr, tpr - fpr, -np.inf)
    if not np.isfinite(j).any():  # too few negatives to resolve max_fpr: the strictest candidate
        j = np.where(fpr == fpr.min(), tpr, -np.inf)
    best = int(np.flatnonzero(j == j.max())[-1])
    threshold = float(cands[best] if best == 0 else (cands[best] + cands[best - 1]) / 2)
    return {
        "threshold": threshold,
        "tpr": float((pos >= threshold).mean()),
        "fpr": float((neg >= threshold).mean()),
        "trimmed": trimmed,
        "trim_at": trim_at,
    }
