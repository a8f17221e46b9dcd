"""Exact validation across ranks: every row of the split scored once, the sums all-reduced.

Ray Train's split drops remainder rows (``equal=True``), so validation does not use it:
every rank reads the whole split and scores the rows with ``index % world == rank``
(picked on the host before the copy); summing :func:`effray.metrics.class_sums` over ranks
gives exactly the full split's numbers. The sums stay on the device until the epoch's one
host read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from effray.data.corrupt import corrupt
from effray.data.pipeline import torch_batches
from effray.metrics import class_sums, score_batches, sums_metrics, sums_size, worst_recall
from effray.models.predict import predict_logits, tta_logits
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


@dataclass(frozen=True)
class CorruptionScore:
    """Mean accuracy under corruptions on the first ``images`` val rows (seeded by ``seed``):
    a search's corruption column, scored on the teacher and on every trial with the same
    images so the drop is fair. ``every_epoch``: also scored after each fine-tuning epoch
    (``val_corruption_accuracy``), so the scheduler can hold ``--max-corruption-drop``."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int
    seed: int
    every_epoch: bool = False

    def score(self, model: Any, val: dict[str, Any], meta: dict[str, Any]) -> float:
        """Mean accuracy of ``model`` over the corrupted copies of the val arrays."""
        return corruption_accuracy(
            model, val, meta, self.corruptions, self.severities, seed=self.seed, images=self.images
        )


def corruption_accuracy(
    model: Any,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    names: Sequence[str],
    severities: Sequence[int],
    *,
    seed: int = 0,
    images: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean accuracy over ``names`` x ``severities`` of ``model`` on the first ``images`` rows
    of a split's decoded ``arrays`` (0 = all), in this process: a search trial's column. The
    images are the ones :func:`effray.evaluate.robustness.robustness` streams (each seeded by its row id)."""
    n = len(arrays["label"]) if images <= 0 else min(images, len(arrays["label"]))
    if n == 0 or not names:
        return float("nan")
    rows, clean, labels = arrays["index"][:n], arrays["image"][:n], np.asarray(arrays["label"][:n], np.int64)
    batches = (
        (
            corrupt(clean[i : i + batch_size], name, s, seed=seed, rows=rows[i : i + batch_size]),
            labels[i : i + batch_size],
        )
        for name in names
        for s in severities
        for i in range(0, n, batch_size)
    )
    model.eval()
    predict = lambda x: predict_logits(model, x, meta["mean"], meta["std"], preprocess=meta.get("preprocess"))  # noqa: E731
    return score_batches(predict, batches, int(meta["num_classes"]))["accuracy"]
