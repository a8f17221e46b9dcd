"""Image bytes -> HWC uint8 arrays, row by row, with a one-line reason for each bad row.

A source's rows hold encoded images (PNG, JPEG, ... by their magic bytes) or raw pixels
(effray's own datasets, or lists of values); a row that is neither, or that PIL cannot
read, is kept as ``None`` with its reason, so a chunk is never lost to one bad file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*")


@dataclass
class DecodedChunk:
    """One chunk's rows, decoded: every row keeps its place, good or bad."""

    images: list[np.ndarray | None]  # HWC uint8, None where the row is bad
    errors: list[str]  # "" where the row is good, else a one-line reason
    names: list[str]


def decode_image(data: bytes, channels: int | None) -> np.ndarray:
    """Decode encoded bytes to HWC uint8 (RGB, or L when ``channels == 1``)."""
    from PIL import Image  # deferred: workers import it once

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = "L" if channels == 1 else "RGB"
        arr = np.asarray(im.convert(mode), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_all(
    encoded: list[bytes | None], names: list[str], channels: int | None, raw_shape: Any = None
) -> DecodedChunk:
    """Rows of file bytes: encoded images decoded (PIL), bytes without an image format's
    magic taken as raw pixels of ``raw_shape`` (or a guessed square)."""
    images: list[np.ndarray | None] = []
    errors: list[str] = []
    for data in encoded:
        img, err = None, ""
        if not data:
            err = "empty or missing image bytes"
        elif not data.startswith(IMAGE_MAGIC):
            shape = tuple(raw_shape) if raw_shape else guess_shape(len(data))
            if shape is not None and int(np.prod(shape)) == len(data):
                img = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            else:
                err = "not an image (unknown format and not raw square pixels)"
        else:
            try:
                img = decode_image(data, channels)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
                err = f"corrupt image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        images.append(img)
        errors.append(err)
    return DecodedChunk(images, errors, list(names))


def raw_pixels(raw: list[np.ndarray | None], names: list[str], shape: Any = None) -> DecodedChunk:
    """Rows of raw pixel values, reshaped to ``shape`` (HWC), or to a square guessed from their size."""
    images: list[np.ndarray | None] = []
    errors: list[str] = []
    for arr in raw:
        img, err = None, ""
        if arr is None:
            err = "empty image"
        else:
            side_c = shape or guess_shape(arr.size)
            if side_c is None or int(np.prod(side_c)) != arr.size:
                err = f"raw pixel row of {arr.size} values is not a square H*W*C image"
            else:
                img = arr.reshape(side_c)
        images.append(img)
        errors.append(err)
    return DecodedChunk(images, errors, names)


def guess_shape(size: int) -> tuple[int, int, int] | None:
    """The square RGB (else grey) HWC shape of ``size`` values, or None."""
    for c in (3, 1):
        side = int(round((size / c) ** 0.5))
        if side * side * c == size:
            return (side, side, c)
    return None
