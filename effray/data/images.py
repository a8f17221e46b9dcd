"""Stored rows -> uint8 NHWC arrays -> normalised float32 NCHW tensors.

The deterministic steps every data path shares (Ray Data's stream, a search's in-memory
arrays, evaluation, data-dependent init): decoding a prepared split's raw pixel bytes,
and effray's one normalisation, which runs on the consumer's device so that images
travel as uint8 (a quarter of float32's bytes through the object store and over PCIe).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from effray.data.prepare import load_meta, split_files
from effray.errors import EffrayError


def decode_batch(table: Any, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Arrow rows of raw HWC bytes -> dict with a uint8 NHWC array.

    Every image has the same byte length, so the binary column's data buffer already *is*
    the pixel array: one zero-copy view per Arrow chunk instead of one object per image."""
    import pyarrow as pa

    column = table.column("image")
    size = int(np.prod(shape))
    parts = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        if pa.types.is_binary(chunk.type) and chunk.null_count == 0:
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
            if offsets[-1] - offsets[0] == size * len(chunk):
                parts.append(
                    np.frombuffer(chunk.buffers()[2], dtype=np.uint8, count=size * len(chunk), offset=int(offsets[0]))
                )
                continue
        parts.append(np.frombuffer(b"".join(chunk.to_pylist()), dtype=np.uint8))
    flat = np.concatenate(parts) if len(parts) != 1 else parts[0]
    out = {name: table.column(name).to_numpy() for name in table.column_names if name != "image"}
    out["image"] = flat.reshape(table.num_rows, *shape)
    out["label"] = out["label"].astype(np.int64, copy=False)
    return out


def channel_stats(mean: Any, std: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(255 * mean, 255 * std)`` as (1, C, 1, 1) float32 tensors on ``device``; ``mean``
    and ``std``: per-channel values in 0..1 units (as meta.json stores them), or one value
    for every channel. Made once per epoch's stream, not per batch: a copy from pageable
    host memory to a GPU waits for the GPU to drain (a host sync)."""
    # checked as host values: these may be created under fake CUDA, where no tensor is read
    m, s = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (mean, std))
    if m.size != s.size and 1 not in (m.size, s.size):
        raise EffrayError(f"normalize: mean has {m.size} values, std {s.size}")
    if not (s > 0).all():
        raise EffrayError(f"normalize: std must be > 0, got {s.tolist()}")
    m, s = (torch.as_tensor(v * 255.0).view(1, -1, 1, 1) for v in (m, s))
    return m.to(device), s.to(device)


def normalize_tensor(images: Any, mean: Any, std: Any, channels_last: bool = False) -> Any:
    """uint8 NHWC tensor (any device) -> float32 ``(x/255 - mean)/std``, NCHW (in
    channels-last memory with ``channels_last``). ``mean``/``std``: per-channel lists, or
    :func:`channel_stats` tensors already on the images' device."""
    if not torch.is_tensor(mean):
        mean, std = channel_stats(mean, std, images.device)
    c = images.shape[-1]
    for name, v in (("mean", mean), ("std", std)):
        if v.numel() not in (1, c):
            raise EffrayError(f"normalize: {name} has {v.numel()} values for {c}-channel images")
    x = images.permute(0, 3, 1, 2)  # a channels-last view; transposing uint8 is 4x cheaper than float
    x = x if channels_last else x.contiguous()
    return x.float().sub_(mean).div_(std)


def sample_images(
    data_dir: str | os.PathLike, n: int, mean: list[float], std: list[float], split: str = "train"
) -> Any:
    """The first ``n`` rows of a split, normalised float32 NCHW: a fixed sample every rank
    reads identically, for data-dependent init (airbench's whitening stem)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shape = tuple(load_meta(data_dir)["image_shape"])
    tables, rows = [], 0
    for f in split_files(data_dir, split):
        if rows >= n:
            break
        t = pq.read_table(f, columns=["image", "label"])
        tables.append(t.slice(0, n - rows))
        rows += tables[-1].num_rows
    images = decode_batch(pa.concat_tables(tables), shape)["image"]
    return normalize_tensor(torch.from_numpy(np.ascontiguousarray(images)), mean, std)
