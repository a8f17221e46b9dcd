"""Ray Data pipelines over the canonical dataset: stream, augment in parallel, normalise.

Deterministic work (read, decode raw bytes) comes first; the random augmentation runs
in ``map_batches`` tasks spread over the cluster, after any cache, so every epoch sees
fresh randomness. Randomness is reproducible from one seed: each batch's generator is
derived from (seed, epoch, first row index), and the epoch comes from a tiny named
actor, the epoch clock (:mod:`effray.data.clock`), that the training loop advances before each epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from effray.config import option, require
from effray.data.augment import augment_arrays, batch_generator, model_input, new_generator, parse_policy
from effray.data.augment_ops import row_key
from effray.data.clock import current_epoch, set_epoch
from effray.data.images import channel_stats, decode_batch
from effray.data.prepare import load_meta, split_files

MAP_BATCH_SIZE = 2048  # rows per augmentation task call (at most): big enough to amortise Ray's per-block cost
MAP_BATCH_BYTES = 8 << 20  # ... and at most this many decoded bytes (55 images of 224x224)
# Ray Data block sizes. Ray's 128 MiB default packs CIFAR-10's decoded training split into
# 2 blocks, i.e. 2 augmentation tasks however big the cluster; effray aims at BLOCKS_PER_CPU
# blocks of the split per cluster CPU, within [MIN, MAX]: 16 MiB on 2 CPUs (each block costs
# ~10 ms of Ray overhead there: 8 MiB blocks ran 15 % slower), 1.2 MiB on 64. MAX bounds
# what streaming holds in flight (32 MiB: 1.2x the peak memory for 4x the data, 16: 1.0-1.1x).
BLOCKS_PER_CPU = 2
MIN_BLOCK_BYTES = 1 << 20
MAX_BLOCK_BYTES = 16 << 20
STREAM_BLOCKS_PER_CPU = 4  # object-store blocks the stream may hold ahead, per cluster CPU
MIN_STREAM_BUFFER = 256 << 20
KEEP_COLUMNS = ("image", "label", "target", "index", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    """Which prepared dataset to stream and how to augment it."""

    data: str = option("", "prepared dataset directory (from `effray data prepare`)")
    augment: str = option(
        "standard", "augmentation policy: none|standard|strong or a chain like 'crop(4)|flip|cutout(8)'"
    )
    augment_on: str = option(
        "cpu", "where augmentation runs: cpu (Ray Data tasks) or gpu (on the training device)", choices=("cpu", "gpu")
    )
    seed: int = option(0, "seed for augmentation and shuffling")
    shuffle_buffer: int = option(2048, "rows in each worker's local shuffle buffer (0 = no shuffle)")
    synthetic: str = option("", "prepared dataset of synthetic images to mix into training (effray synth sample)")
    synthetic_ratio: float = option(0.0, "fraction of the training stream drawn from --synthetic")
    cache_decoded: bool = option(
        True,
        "keep the decoded training split in the object store when it fits a quarter of it (random ops still run "
        "fresh every epoch); --no-cache-decoded streams from Parquet every epoch",
    )
    stream_buffer_mb: int = option(
        0,
        "object-store MB the pipeline may fill ahead of training; bounds memory whatever the data size (0 = 4 blocks "
        "per cluster CPU, at least 256)",
    )

    def validate(self) -> None:
        require(self.shuffle_buffer >= 0, f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        require(self.stream_buffer_mb >= 0, f"--stream-buffer-mb must be >= 0 (0 = auto), got {self.stream_buffer_mb}")
        require(0.0 <= self.synthetic_ratio < 1.0, f"--synthetic-ratio must be in [0, 1), got {self.synthetic_ratio}")
        require(not (self.synthetic_ratio > 0 and not self.synthetic), "--synthetic-ratio needs --synthetic DIR")


# ------------------------------------------------------------------ batch functions


def decode_rows(batch: Any, *, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The decoding ``map_batches`` UDF: Arrow rows -> the columns training keeps, uint8
    NHWC images (a quarter of float32's bytes through the object store and over PCIe; the
    consumer normalises them on its device, :func:`torch_batches`)."""
    return {k: v for k, v in decode_batch(batch, shape).items() if k in KEEP_COLUMNS}


def augment_rows(
    batch: dict[str, np.ndarray],
    *,
    policy: str,
    num_classes: int,
    seed: int,
    clock: str = "",
    epoch: int | None = None,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """The augmenting ``map_batches`` UDF over decoded rows, with a generator keyed by
    (seed, epoch, first row): the same batch gets the same draws wherever it runs, a new
    epoch fresh ones. The epoch is ``epoch`` when given, else the ``clock``'s; torch runs
    on ``threads`` threads (the task's CPUs)."""
    if epoch is None and clock:
        epoch = current_epoch(clock)
    if epoch is not None:
        first = row_key(int(batch["index"][0]), int(batch["synthetic"][0]) if "synthetic" in batch else None)
        generator = batch_generator(seed, epoch, first)
    else:  # no clock: fresh but not reproducible randomness
        generator = new_generator("cpu")
        generator.seed()
    out = augment_arrays(
        batch, parse_policy(policy, num_classes), generator, seed=seed, epoch=epoch or 0, threads=threads
    )
    return {k: v for k, v in out.items() if k in KEEP_COLUMNS}


class ToModelInput(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: numpy columns -> CPU tensors, images still
    uint8 NHWC. Ray's finalize step then copies the batch to the consumer's device (inside
    a Train worker: its GPU), a quarter of float32's bytes over PCIe; :func:`torch_batches`
    normalises there. ``rows=(r, n)`` keeps only the rows with ``index % n == r``, chosen
    here on the host, so a rank's validation rows reach its device without any
    data-dependent indexing (a host sync) on the device."""

    def __init__(self, rows: tuple[int, int] | None = None) -> None:
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if self.rows is not None and self.rows[1] > 1:
            keep = (batch["index"] % self.rows[1]) == self.rows[0]
            batch = {k: v[keep] for k, v in batch.items()}
        # Ray hands out read-only views of the object store; torch wants writable memory
        return {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}


# ------------------------------------------------------------------ datasets


def read_split(
    data_dir: str | os.PathLike,
    split: str,
    stream_buffer_mb: int = 0,
    shuffle_seed: int | None = None,
    num_cpus: float | None = None,
) -> Any:
    """The raw rows of one split as a Ray Dataset (sorted shards: reproducible order; with
    ``shuffle_seed`` the shard order is permuted afresh every time the dataset runs, i.e.
    every epoch), under effray's block size and stream buffer (:func:`data_context`),
    which every dataset derived from it inherits."""
    from ray.data import FileShuffleConfig

    meta = load_meta(data_dir)
    split_bytes = meta["counts"].get(split, 0) * int(np.prod(meta["image_shape"]))
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    return read_parquet(
        split_files(data_dir, split),
        ["image", "label", "index", "synthetic"],
        data_context(split_bytes, stream_buffer_mb),
        shuffle=shuffle,
        num_cpus=num_cpus,
    )


def read_parquet(
    files: list[str], columns: list[str], ctx: Any = None, shuffle: Any = None, num_cpus: float | None = None
) -> Any:
    """``ray.data.read_parquet`` under ``ctx`` (default: the current DataContext) through
    Ray Data's file-per-task Parquet reader, chosen when the dataset is built, whatever
    this process's environment says: Ray Data's newer reader lists files through
    FooterReader actors started afresh on every execution, a new Python process for every
    streamed epoch and every evaluation pass (docs/design.md#the-data-pipeline)."""
    import ray
    from ray.data import DataContext

    ctx = (ctx or DataContext.get_current()).copy()
    ctx.use_datasource_v2 = False
    with DataContext.current(ctx):
        return ray.data.read_parquet(files, columns=columns, shuffle=shuffle, num_cpus=num_cpus)


def data_context(split_bytes: int, stream_buffer_mb: int = 0) -> Any:
    """The current DataContext with a block size for this split and cluster
    (:func:`block_bytes`) and an object-store budget for the stream: the smaller of any
    limit already set and ``stream_buffer_mb``, or 4 blocks per cluster CPU when 0.
    Memory then stays flat however much data streams; without a budget Ray Data fills up
    to half the object store whenever reading outpaces training, so memory grows with the
    epoch's length until it gets there."""
    import ray
    from ray.data import DataContext

    cpus = int(ray.cluster_resources().get("CPU", 1))
    ctx = DataContext.get_current().copy()
    ctx.target_max_block_size = block_bytes(split_bytes, cpus)
    budget = stream_buffer_mb << 20 or max(MIN_STREAM_BUFFER, STREAM_BLOCKS_PER_CPU * ctx.target_max_block_size * cpus)
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=min(limits.object_store_memory, budget))
    return ctx


def block_bytes(split_bytes: int, cpus: int) -> int:
    """Block target: :data:`BLOCKS_PER_CPU` blocks of the decoded split per cluster CPU,
    clamped to [:data:`MIN_BLOCK_BYTES`, :data:`MAX_BLOCK_BYTES`]."""
    return int(min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, split_bytes // max(1, BLOCKS_PER_CPU * cpus))))


def map_batch_rows(meta: dict[str, Any]) -> int:
    """Rows per map batch: :data:`MAP_BATCH_SIZE`, fewer for images so large that a batch
    would pass :data:`MAP_BATCH_BYTES`."""
    return int(max(1, min(MAP_BATCH_SIZE, MAP_BATCH_BYTES // int(np.prod(meta["image_shape"])))))


def train_dataset(cfg: DataConfig, clock: str = "", num_cpus: float = 1) -> Any:
    """The augmented training stream (uint8 NHWC images; see :func:`torch_batches`).

    Rows are decoded, then (when the decoded split fits a quarter of the object store and
    ``cache_decoded``) cached, so later epochs skip Parquet reads and decoding on cores the
    trainers need; then the random ops run, fresh every epoch. With ``augment_on == 'gpu'``
    no augmentation runs here: the training worker applies the torch version on its device."""
    meta = load_meta(cfg.data)
    parse_policy(cfg.augment, meta["num_classes"])  # fail fast, before any task starts
    cache = cfg.cache_decoded and fits_object_store(meta, cfg.synthetic_ratio)
    # streamed: a new shard order every epoch, so no rank sees the same shards each time
    ds = read_split(cfg.data, "train", cfg.stream_buffer_mb, None if cache else cfg.seed, num_cpus)
    if cfg.synthetic:
        ds = mix_synthetic(ds, cfg, meta, num_cpus)
    ds = _decode(ds, meta, num_cpus)
    if cache:
        ds = ds.materialize()
    policy = cfg.augment if cfg.augment_on == "cpu" else "none"
    if parse_policy(policy, meta["num_classes"]).is_identity:
        return ds
    return ds.map_batches(
        augment_rows,
        batch_size=map_batch_rows(meta),
        batch_format="numpy",
        num_cpus=num_cpus,
        fn_kwargs={
            "policy": policy,
            "num_classes": meta["num_classes"],
            "seed": cfg.seed,
            "clock": clock,
            "threads": max(1, int(num_cpus)),
        },
    )


def fits_object_store(meta: dict[str, Any], synthetic_ratio: float = 0.0, fraction: float = 0.25) -> bool:
    """Whether the decoded training split takes at most ``fraction`` of the cluster's
    object store (CIFAR-10's 50k images: 150 MB)."""
    import ray

    rows = meta["counts"].get("train", 0) / max(1e-9, 1.0 - synthetic_ratio)
    return rows * int(np.prod(meta["image_shape"])) <= fraction * ray.cluster_resources().get("object_store_memory", 0)


def _decode(ds: Any, meta: dict[str, Any], num_cpus: float) -> Any:
    return ds.map_batches(
        decode_rows,
        batch_size=map_batch_rows(meta),
        batch_format="pyarrow",
        num_cpus=num_cpus,
        fn_kwargs={"shape": tuple(meta["image_shape"])},
    )


def mix_synthetic(ds: Any, cfg: DataConfig, meta: dict[str, Any], num_cpus: float | None = None) -> Any:
    """Add synthetic rows so they make up ``synthetic_ratio`` of the training stream."""
    n_syn = synthetic_rows(cfg, meta)
    synthetic = read_split(cfg.synthetic, "train", cfg.stream_buffer_mb, num_cpus=num_cpus)
    return ds.union(synthetic.limit(n_syn)) if n_syn else ds


def synthetic_rows(cfg: DataConfig, meta: dict[str, Any]) -> int:
    """How many rows of ``--synthetic`` make them ``--synthetic-ratio`` of the training
    stream; checks the synthetic set matches the data and holds that many."""
    syn_meta = validate_data_dir(cfg.synthetic)
    require(
        syn_meta["image_shape"] == meta["image_shape"] and syn_meta["num_classes"] == meta["num_classes"],
        f"--synthetic {cfg.synthetic} has shape {syn_meta['image_shape']} / {syn_meta['num_classes']} classes, "
        f"the data has {meta['image_shape']} / {meta['num_classes']}; sample it from a generator trained on this data",
    )
    n_syn = int(round(cfg.synthetic_ratio / (1.0 - cfg.synthetic_ratio) * meta["counts"]["train"]))
    available = syn_meta["counts"].get("train", 0)
    require(
        n_syn <= available,
        f"--synthetic-ratio {cfg.synthetic_ratio} needs {n_syn} synthetic rows, {cfg.synthetic} has {available}; "
        "sample more or lower the ratio",
    )
    return n_syn


def eval_dataset(data_dir: str | os.PathLike, split: str = "val", num_cpus: float = 1) -> Any:
    """Decode only, no augmentation: for validation and evaluation."""
    return _decode(read_split(data_dir, split, num_cpus=num_cpus), load_meta(data_dir), num_cpus)


def torch_batches(
    ds: Any,
    meta: dict[str, Any],
    batch_size: int,
    *,
    clock: str = "",
    epoch: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    normalise: bool = True,
    channels_last: bool = False,
    prefetch_batches: int = 2,
    rows: tuple[int, int] | None = None,
) -> Any:
    """One epoch of torch batches from a Dataset or a Train worker's shard (DataIterator),
    on the consumer's device (a Train worker's GPU, else the CPU).

    Advances the epoch clock first (idempotent, so every rank may do it), then streams
    with an optional seeded local shuffle. Images travel as uint8 and are preprocessed
    (``meta["preprocess"]``, a model's) and normalised to float32 NCHW on the device
    (``normalise=False`` keeps them uint8 NHWC, for on-device augmentation); ``rows=(r, n)``:
    only rows with ``index % n == r``."""
    if clock:
        set_epoch(clock, epoch)
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "prefetch_batches": prefetch_batches,
        "collate_fn": ToModelInput(rows),
        "pin_memory": _to_gpu(),
    }
    if shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed * 100003 + epoch)
    batches = ds.iter_torch_batches(**kwargs)
    if not normalise:
        return batches
    return _normalised(batches, meta, channels_last)


def _normalised(batches: Any, meta: dict[str, Any], channels_last: bool) -> Any:
    """Each batch as the model takes it: ``meta``'s preprocessing (a model's, when its rows
    are stored at another size; none in a dataset's own meta), then its normalisation."""
    stats = None
    for b in batches:
        if stats is None or stats[0].device != b["image"].device:
            stats = channel_stats(meta["mean"], meta["std"], b["image"].device)
        yield {**b, "image": model_input(b["image"], meta.get("preprocess"), *stats, channels_last)}


def _to_gpu() -> bool:
    """Whether ``iter_torch_batches(device="auto")`` will copy to a GPU (then pinned host
    memory makes the copy asynchronous)."""
    try:
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker

        return bool(_in_ray_train_worker() and get_device().type == "cuda")
    except Exception:  # noqa: BLE001 - outside Ray Train, or an older Ray: plain pageable copies
        return False


def validate_data_dir(data_dir: str) -> dict[str, Any]:
    """Load meta and check the shards exist, so a bad --data fails before workers start."""
    require(bool(data_dir), "--data DIR is required (a dataset from `effray data prepare`)")
    meta = load_meta(data_dir)
    for split in meta["splits"]:
        split_files(data_dir, split)
    return meta
