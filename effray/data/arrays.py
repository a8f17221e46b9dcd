"""A prepared split as decoded arrays in memory, and epochs of augmented batches from them.

What a search shares between its trials: the driver decodes each split once and puts the
arrays in Ray's object store; every trial on a node maps the same shared memory
(zero-copy, read-only) instead of reading Parquet and starting a Ray Data stream of its
own. A trial's epochs are then drawn here, in the trial's process: a seeded permutation
per epoch, the same policy functions Ray Data's augment tasks run (fresh draws per
epoch and batch, reproducible from ``(seed, epoch, batch)``), and the uint8 images
normalised on the trial's device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from effray.config import require
from effray.data.augment import batch_generator, model_input, parse_policy, preprocess_image
from effray.data.images import channel_stats, decode_batch
from effray.data.prepare import load_meta, split_files
from effray.data.sources import load_chunk, plan_source

Arrays = dict[str, np.ndarray]
Batches = Iterator[tuple[np.ndarray, np.ndarray]]


def split_bytes(meta: dict[str, Any], split: str) -> int:
    """Decoded size of a split (uint8 pixels)."""
    return int(meta["counts"].get(split, 0)) * int(np.prod(meta["image_shape"]))


def load_arrays(data_dir: str | os.PathLike, split: str, limit: int = 0) -> Arrays:
    """``{"image": uint8 NHWC, "label": int64, "index": int64}`` of a split's rows in file
    order (the first ``limit`` rows when > 0), read with pyarrow on this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shape = tuple(load_meta(data_dir)["image_shape"])
    tables, rows = [], 0
    for f in split_files(data_dir, split):
        t = pq.read_table(
            f, columns=[c for c in ("image", "label", "index", "synthetic") if c in pq.read_schema(f).names]
        )
        tables.append(t if not limit else t.slice(0, limit - rows))
        rows += tables[-1].num_rows
        if limit and rows >= limit:
            break
    decoded = decode_batch(pa.concat_tables(tables).combine_chunks(), shape)
    synthetic = decoded.get("synthetic", np.zeros(len(decoded["label"]), bool))
    return {
        "image": np.ascontiguousarray(decoded["image"]),
        "label": decoded["label"].astype(np.int64),
        "index": decoded["index"].astype(np.int64),
        "synthetic": np.asarray(synthetic, bool),
    }


def concat_arrays(first: Arrays, second: Arrays) -> Arrays:
    """Rows of ``first`` then ``second`` (the columns both have)."""
    return {k: np.concatenate([first[k], second[k]]) for k in first if k in second}


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of ``range(rows)``: a pure function of (seed, epoch), so
    every rank, a resumed run and a search trial draw the same one."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x5EED])).permutation(rows)


def epoch_batches(
    arrays: Arrays,
    meta: dict[str, Any],
    batch_size: int,
    *,
    policy: str,
    seed: int,
    epoch: int,
    device: Any,
    channels_last: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """One epoch of ``(normalised images, labels)`` on ``device``: rows shuffled by a
    permutation of ``(seed, epoch)``, every batch augmented by ``policy`` with its own
    ``(seed, epoch, batch)`` generator. The last partial batch is kept."""
    import torch

    n = len(arrays["label"])
    order = epoch_order(n, seed, epoch)
    augment = parse_policy(policy, int(meta["num_classes"]))
    stats = None
    for b, start in enumerate(range(0, n, batch_size)):
        rows = order[start : start + batch_size]
        batch = {k: torch.from_numpy(arrays[k][rows]) for k in ("image", "label", "index")}
        if not augment.is_identity:  # on this process's CPU, as Ray Data's tasks would
            batch = augment(batch, batch_generator(seed, epoch, b), seed=seed, epoch=epoch)
        images = batch["image"].to(device, non_blocking=True)
        if stats is None:
            stats = channel_stats(meta["mean"], meta["std"], images.device)
        yield (
            model_input(images, meta.get("preprocess"), *stats, channels_last),
            batch["label"].to(device, non_blocking=True),
        )


def eval_batches(arrays: Arrays, meta: dict[str, Any], batch_size: int) -> list[tuple[Any, Any]]:
    """Unaugmented CPU batches in row order (``meta``'s preprocessing, a model's, applied):
    validation and calibration."""
    import torch

    out = []
    for start in range(0, len(arrays["label"]), batch_size):
        images = torch.from_numpy(arrays["image"][start : start + batch_size].copy())
        out.append(
            (
                model_input(images, meta.get("preprocess"), meta["mean"], meta["std"]),
                torch.from_numpy(arrays["label"][start : start + batch_size].copy()),
            )
        )
    return out


def prepared_batches(data_dir: str | os.PathLike, split: str, batch_size: int) -> tuple[dict[str, Any], Batches]:
    """(meta, batches of uint8 NHWC images + int64 labels) of one split of a prepared dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = load_meta(data_dir)
    files, shape = split_files(data_dir, split), tuple(meta["image_shape"])

    def gen() -> Batches:
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
                batch = decode_batch(pa.Table.from_batches([rb]), shape)  # the pipeline's own decode
                yield batch["image"].copy(), batch["label"]

    return meta, gen()


def encoded_batches(
    path: str | os.PathLike, channels: int, counter: dict[str, int], preprocess: str | None = None
) -> Batches:
    """Batches from Parquet with encoded image bytes + label; unreadable rows are skipped
    and counted in ``counter["skipped_bad"]``. ``preprocess`` (a model's) brings images of
    any size to the model's, one by one (without it, mixed sizes are an error)."""
    plan = plan_source(f"parquet:{path}")
    for chunk in plan.chunks:
        decoded, labels = load_chunk(chunk, channels)
        ok = [i for i, e in enumerate(decoded.errors) if not e]
        counter["skipped_bad"] += len(decoded.errors) - len(ok)
        if ok:
            images = [preprocess_image(decoded.images[i], preprocess) for i in ok]
            shapes = {im.shape for im in images}
            require(len(shapes) == 1, f"{path} mixes image sizes {sorted(shapes)}; evaluate one size at a time")
            yield np.stack(images), labels[ok]
