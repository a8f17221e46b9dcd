"""Exact validation across ranks: every row of the split scored once, the sums all-reduced.

Ray Train's split drops remainder rows (``equal=True``), so validation does not use it:
every rank reads the whole split and scores the rows with ``index % world == rank``
(picked on the host before the copy); summing :func:`effray.metrics.class_sums` over ranks
gives exactly the full split's numbers. The sums stay on the device until the epoch's one
host read.
"""

from __future__ import annotations

from typing import Any

import torch

from effray.data.pipeline import torch_batches
from effray.metrics import class_sums, sums_metrics, sums_size, worst_recall
from effray.models.predict import tta_logits
from effray.train.strategy import Strategy


def validation_sums(
    strategy: Strategy,
    model: torch.nn.Module,
    shard: Any,
    meta: dict[str, Any],
    batch: int,
    rank: int,
    world: int,
    num_classes: int,
    tta: int = 0,
) -> torch.Tensor:
    """:func:`class_sums` over this replica's rows (``index % world == rank``, picked on the
    host before the copy), summed over replicas, left on the device: nothing here waits
    for the GPU."""
    model.eval()  # running BN statistics, and none of them updated by validation
    strategy.sync_for_eval(model)
    sums = torch.zeros(sums_size(num_classes), dtype=torch.float64, device=strategy.reduce_device)
    for b in torch_batches(shard, meta, batch, channels_last=strategy.channels_last, rows=(rank, world)):
        if len(b["label"]) == 0:  # a shape, known on the host
            continue
        sums += batch_sums(strategy, model, b["image"], b["label"], num_classes, tta).to(sums.device)
    return strategy.sum_replicas(sums)


@torch.no_grad()
def batch_sums(
    strategy: Strategy,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    tta: int = 0,
) -> torch.Tensor:
    """:func:`class_sums` of one validation batch, scored with test-time augmentation
    ``tta``, on the model's device."""
    return class_sums(tta_logits(lambda x: strategy.predict(model, x), images, tta), labels, num_classes)


def validation_metrics(sums: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The epoch's one host read of the validation sums, as the reported metrics."""
    return reported(sums_metrics(sums, num_classes))


def reported(m: dict[str, Any]) -> dict[str, Any]:
    """:func:`~effray.metrics.sums_metrics` under the names every epoch reports them by."""
    return {
        "val_accuracy": m["accuracy"],
        "val_loss": m["loss"],
        "val_count": m["count"],
        "val_per_class_accuracy": m["per_class"],
        "val_worst_class_recall": worst_recall(m["per_class"]),
        "val_ece_scaled": m["ece_scaled"],  # after the grid's best temperature: what --max-ece holds every epoch
    }


def validate(
    strategy: Strategy,
    model: torch.nn.Module,
    shard: Any,
    meta: dict[str, Any],
    batch: int,
    rank: int,
    world: int,
    num_classes: int,
    tta: int = 0,
) -> dict[str, Any]:
    """Accuracy, loss and per-class accuracy on the *whole* validation split.

    Every rank reads the full split and scores the rows with ``index % world == rank``;
    summing (correct, loss, count, per-class) over ranks gives exactly the full split's
    numbers, with no row dropped or counted twice."""
    return validation_metrics(
        validation_sums(strategy, model, shard, meta, batch, rank, world, num_classes, tta), num_classes
    )
