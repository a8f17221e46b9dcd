"""A trial's data: the driver's decoded splits shared through the object store, or a stream.

Decoding the training split costs each trial as much as a short fine-tune, so when the
decoded train and val arrays fit a quarter of the object store the driver decodes them
once and every in-process trial reads zero-copy views of the same memory, augmenting its
own epochs from them (:func:`effray.data.arrays.epoch_batches`). Otherwise (or with
``--no-share-data``) each trial streams its epochs through a Ray Data pipeline of its own.
Trials on Ray Train workers always stream: their workers read their own shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from effray.compress.config import CompressConfig
from effray.compress.run import eval_and_calib, xy_batches
from effray.data.arrays import epoch_batches, eval_batches, load_arrays, split_bytes
from effray.data.clock import kill_clock
from effray.data.pipeline import DataConfig, torch_batches, train_dataset
from effray.search.config import TuneConfig
from effray.search.context import TrialContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedSplits:
    """Object refs of the decoded ``train`` and ``val`` arrays the driver put once."""

    train: Any
    val: Any


@dataclass(frozen=True)
class TrialData:
    """What an in-process trial trains and scores on. ``val`` is the full val arrays when
    they are shared (the corruption score reuses them), else None; ``close`` ends the
    trial's own pipeline, if it has one."""

    train_batches: Callable[[int], Iterable[Any]]
    evals: list
    calib: list
    rows: int
    val: dict[str, Any] | None
    close: Callable[[], None]


def shares_data(cfg: TuneConfig, meta: dict[str, Any]) -> bool:
    """In-process trials share the decoded splits when they fit a quarter of the object store."""
    import ray

    if not cfg.share_data or cfg.workers_per_trial > 1:
        return False
    need = split_bytes(meta, "train") + split_bytes(meta, "val")
    fits = need <= 0.25 * ray.cluster_resources().get("object_store_memory", 0)
    if not fits:
        log.warning(
            "the decoded splits (%d MB) pass a quarter of the object store: every trial streams its own", need >> 20
        )
    return fits


def share_splits(data_dir: str) -> SharedSplits:
    """The decoded train and val splits, once, in the object store."""
    import ray

    return SharedSplits(train=ray.put(load_arrays(data_dir, "train")), val=ray.put(load_arrays(data_dir, "val")))


def trial_data(
    ctx: TrialContext,
    cfg: CompressConfig,
    trial_id: str,
    meta: dict[str, Any],
    device: Any,
    shared: SharedSplits | None,
) -> TrialData:
    """The epochs, validation and calibration batches of an in-process trial: from the
    shared arrays when there are some, else from a Ray Data pipeline of its own."""
    bs, ebs = cfg.finetune_batch_size, ctx.eval_batch_size
    if shared is not None:
        import ray

        train, val = ray.get(shared.train), ray.get(shared.val)  # zero-copy views of the driver's arrays
        calib_rows = {k: v[: ebs * cfg.calib_batches] for k, v in train.items()}

        def from_arrays(epoch: int) -> Iterable[Any]:
            return epoch_batches(train, meta, bs, policy=ctx.augment, seed=ctx.seed, epoch=epoch, device=device)

        return TrialData(
            train_batches=from_arrays,
            evals=eval_batches(val, meta, ebs),
            calib=eval_batches(calib_rows, meta, ebs),
            rows=len(train["label"]),
            val=val,
            close=lambda: None,
        )

    data_cfg = DataConfig(data=ctx.data, augment=ctx.augment, seed=ctx.seed)
    clock = f"tune-{ctx.name}-{trial_id}"
    train_ds = train_dataset(data_cfg, clock=clock)

    def streamed(epoch: int) -> Iterable[Any]:
        return xy_batches(
            torch_batches(
                train_ds, meta, bs, clock=clock, epoch=epoch, shuffle_buffer=data_cfg.shuffle_buffer, seed=ctx.seed
            )
        )

    evals, _, calib = eval_and_calib(ctx.data, meta, ebs, cfg.calib_batches)
    return TrialData(
        train_batches=streamed,
        evals=evals,
        calib=calib,
        rows=meta["counts"]["train"],
        val=None,
        close=lambda: kill_clock(clock),
    )
