"""What "near duplicate" means: light copies of real images, and the threshold that tells
them from different images.

A *light copy* (:data:`KINDS`) of an image is: ``crop``, 1-3 px cut from each side
(independently) and resized back to full size, as Barz & Denzler's ciFAIR near-duplicates
are; ``flip``, its horizontal mirror; ``jpeg``, re-encoded at quality 75; or
``crop+flip+jpeg``, all three. The threshold is the similarity that best separates
``sim(image, its light copy)`` from ``sim(image, its nearest other real image)`` over a
seeded sample of train images (the largest TPR - FPR), so the report can say what it
means: the share of copies it finds and the share of real images it flags.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

KINDS = ("crop", "flip", "jpeg", "crop+flip+jpeg")
CROP_PX = (1, 3)
JPEG_QUALITY = 75
DEFINITION = (
    f"a near duplicate is a light copy: cut {CROP_PX[0]}-{CROP_PX[1]} px from each side and resized back "
    f"(crop), mirrored (flip), re-encoded as JPEG q{JPEG_QUALITY}, or all three"
)


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
    images: np.ndarray, kinds: tuple[str, ...] = KINDS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every kind of copy of every image: ``(copies, source position, kind)``, reproducible
    from ``seed``."""
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


MAX_FPR = 0.01


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, max_fpr: float = MAX_FPR) -> dict[str, float]:
    """The threshold with the largest TPR - FPR among those that flag at most ``max_fpr`` of
    the real images (``score >= threshold`` is flagged; ties go to the highest), placed
    halfway to the next lower score. Near duplicates are rare and every real image is a
    candidate false positive, so the rate is capped: the unconstrained best TPR - FPR
    buys its last few points of recall by flagging many real images. Returns it with its
    TPR (copies found) and FPR (real images above it).

    A sampled image whose nearest other image is at least as similar as the median light
    copy has a near duplicate of its own in the data: it is no negative and is left out
    (``trimmed`` counts them), or a dataset full of copies would calibrate itself loose."""
    pos = np.sort(np.asarray(positives, np.float64))
    neg = np.asarray(negatives, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("choose_threshold needs positives and negatives")
    keep = neg < np.median(pos)
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
    }
