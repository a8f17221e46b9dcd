"""Exact per-epoch shuffles for data-parallel training.

Ray Train's streaming split deals the same rows to the same rank every epoch, in nearly
the same order: each rank sees a fixed part of the data, mixed only by a local buffer.
The best CIFAR recipes (airbench) take a fresh permutation of *all* rows every epoch.
When the decoded training split fits the object store, effray therefore keeps it there
once (:func:`cache_split`, one object of numpy arrays every node maps read-only) and,
each epoch, every data-parallel replica ``r`` of ``R`` reads ``perm[r::R]`` of the
epoch's permutation of ``(seed, epoch)`` (:func:`replica_rows`), in order. With a global
batch ``B`` (a multiple of ``R``), step ``k`` then trains on exactly
``perm[k*B:(k+1)*B]``, as one process with batch ``B`` would, on any number of ranks.
The gathers and random ops run as Ray Data tasks anywhere in the cluster
(:func:`epoch_dataset`), streamed to the replica in order.

Data too big for the object store streams from Parquet instead
(:func:`effray.data.pipeline.train_dataset`): shard order is permuted every epoch and a
local buffer mixes rows, which costs no memory but keeps a shard's rows close together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.data.arrays import Arrays, concat_arrays, epoch_order, load_arrays
from effray.data.augment import parse_policy
from effray.data.pipeline import (
    DataConfig,
    augment_rows,
    block_bytes,
    data_context,
    fits_object_store,
    map_batch_rows,
    synthetic_rows,
    torch_batches,
)
from effray.data.prepare import load_meta


@dataclass(frozen=True)
class CachedSplit:
    """The training rows in the object store, and how to augment them: what each replica
    needs to build its epochs (picklable: it travels in Ray Train's loop config)."""

    ref: Any  # ObjectRef of Arrays: image (uint8 NHWC), label, index, synthetic
    rows: int
    row_bytes: int
    policy: str  # "none" when the training device augments (--augment-on gpu)
    num_classes: int
    seed: int
    num_cpus: float
    map_rows: int  # rows per augmentation call (bounds a call's float32 intermediates)
    task_rows: int  # rows per Ray Data task: effray's block size (a task costs Ray ~10-40 ms)
    stream_buffer_mb: int


def cache_split(cfg: DataConfig, num_cpus: float = 1) -> CachedSplit | None:
    """Put the decoded training split (plus any mixed-in synthetic rows) in the object
    store, or None when ``--no-cache-decoded`` or it would take more than a quarter of it
    (then it streams). Called on the driver, which owns the object for the run."""
    import ray

    meta = load_meta(cfg.data)
    parse_policy(cfg.augment, meta["num_classes"])  # fail fast, before anything is read
    if not (cfg.cache_decoded and fits_object_store(meta, cfg.synthetic_ratio)):
        return None
    arrays = load_arrays(cfg.data, "train")
    if cfg.synthetic:
        n_syn = synthetic_rows(cfg, meta)
        if n_syn:
            arrays = concat_arrays(arrays, load_arrays(cfg.synthetic, "train", limit=n_syn))
    rows, row_bytes = len(arrays["label"]), int(np.prod(meta["image_shape"]))
    map_rows = map_batch_rows(meta)
    block = block_bytes(rows * row_bytes, int(ray.cluster_resources().get("CPU", 1)))
    return CachedSplit(
        ref=ray.put(arrays),
        rows=rows,
        row_bytes=row_bytes,
        policy=cfg.augment if cfg.augment_on == "cpu" else "none",
        num_classes=int(meta["num_classes"]),
        seed=cfg.seed,
        num_cpus=num_cpus,
        map_rows=map_rows,
        task_rows=max(map_rows, block // row_bytes),
        stream_buffer_mb=cfg.stream_buffer_mb,
    )


def kept_rows(rows: int, batch_size: int, replicas: int) -> int:
    """Rows an epoch trains on: all of them, unless the last global batch would leave a
    replica without a row (``rows % batch_size < replicas``); then those few are left out
    (a different few every epoch), so every replica takes the same number of steps."""
    tail = rows % batch_size
    return rows - tail if 0 < tail < replicas else rows


def replica_rows(rows: int, seed: int, epoch: int, replica: int, replicas: int, batch_size: int) -> np.ndarray:
    """Positions of the rows ``replica`` of ``replicas`` trains on in ``epoch``, in order:
    ``perm[replica::replicas]`` of the epoch's permutation. Disjoint across replicas,
    their union every kept row once; batch ``k`` of ``batch_size // replicas`` rows is this
    replica's share of ``perm[k*batch_size:(k+1)*batch_size]``."""
    if batch_size % replicas:
        raise ValueError(f"global batch {batch_size} is not a multiple of {replicas} replicas")
    return epoch_order(rows, seed, epoch)[: kept_rows(rows, batch_size, replicas)][replica::replicas]


def steps_per_epoch(rows: int, batch_size: int, replicas: int) -> int:
    """Optimizer steps in one epoch of :func:`replica_rows` (every replica takes as many)."""
    return -(-kept_rows(rows, batch_size, replicas) // batch_size)


def gather_rows(
    batch: dict[str, np.ndarray], *, source: CachedSplit, epoch: int, replica: int, replicas: int, batch_size: int
) -> dict[str, np.ndarray]:
    """The ``map_batches`` UDF: chunk ``batch["id"][0]`` of this replica's epoch, gathered
    from the cached arrays (a zero-copy map on this node) and augmented ``map_rows`` at
    a time, each with a (seed, epoch, first row)-derived generator: the same draws
    wherever it runs."""
    import ray

    chunk = int(batch["id"][0])
    positions = replica_rows(source.rows, source.seed, epoch, replica, replicas, batch_size)
    positions = positions[chunk * source.task_rows : (chunk + 1) * source.task_rows]
    arrays: Arrays = ray.get(source.ref)
    if parse_policy(source.policy, source.num_classes).is_identity:
        return {k: v[positions] for k, v in arrays.items()}
    parts = [
        augment_rows(
            {k: v[positions[i : i + source.map_rows]] for k, v in arrays.items()},
            policy=source.policy,
            num_classes=source.num_classes,
            seed=source.seed,
            epoch=epoch,
            threads=max(1, int(source.num_cpus)),
        )
        for i in range(0, len(positions), source.map_rows)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def epoch_dataset(source: CachedSplit, epoch: int, replica: int = 0, replicas: int = 1, batch_size: int = 1) -> Any:
    """This replica's rows of ``epoch`` as a Ray Dataset, in permutation order: one
    gather-and-augment task per block of rows (effray's block size for the split and the
    cluster, :func:`effray.data.pipeline.block_bytes`), under the run's object-store
    budget. Built afresh each epoch (on the replica's process)."""
    import ray
    from ray.data import DataContext

    count = len(replica_rows(source.rows, source.seed, epoch, replica, replicas, batch_size))
    chunks = max(1, -(-count // source.task_rows))
    ctx = data_context(source.rows * source.row_bytes, source.stream_buffer_mb)
    ctx.execution_options.preserve_order = True  # the order *is* the shuffle
    ctx.enable_progress_bars = False
    with DataContext.current(ctx):
        # the chunk numbers as in-memory blocks, not ray.data.range: its read tasks ask for a
        # whole CPU, which a cluster whose trainers hold all but --data-cpus never frees
        return ray.data.from_items([{"id": i} for i in range(chunks)], override_num_blocks=chunks).map_batches(
            gather_rows,
            batch_size=1,
            batch_format="numpy",
            num_cpus=source.num_cpus,
            fn_kwargs={
                "source": source,
                "epoch": epoch,
                "replica": replica,
                "replicas": replicas,
                "batch_size": batch_size,
            },
        )


def training_batches(
    source: CachedSplit | None,
    shard: Any,
    meta: dict[str, Any],
    batch_size: int,
    *,
    epoch: int,
    replica: int,
    replicas: int,
    clock: str,
    shuffle_buffer: int,
    seed: int,
    **kw: Any,
) -> Any:
    """One epoch of a replica's torch batches of ``batch_size``: from the cached split in
    the exact shuffle's order when there is one (the global batch is ``batch_size x
    replicas``), else from its Ray Train ``shard`` (clock-keyed augmentation, local
    buffer). ``kw``: the rest of :func:`torch_batches`."""
    if source is not None:
        return torch_batches(
            epoch_dataset(source, epoch, replica, replicas, batch_size * replicas), meta, batch_size, **kw
        )
    return torch_batches(
        shard, meta, batch_size, clock=clock, epoch=epoch, shuffle_buffer=shuffle_buffer, seed=seed, **kw
    )
