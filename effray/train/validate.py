"""Exact validation across ranks: every row of the split scored once, the sums all-reduced.

Ray Train's split drops remainder rows (``equal=True``), so validation does not use it:
every rank reads the whole split and scores the rows with ``index % world == rank``
(picked on the host before the copy); summing :func:`effray.metrics.class_sums` over ranks
gives exactly the full split's numbers. The sums stay on the device until the epoch's one
host read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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


Batches = Iterable[tuple[np.ndarray, np.ndarray]]
KEPT_BYTES = 256 * 2**20  # corrupted copies kept in memory up to this size; larger ones are made again each time


class _Remade:
    """Corrupted copies too large to keep: made again on every pass."""

    def __init__(self, make: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.make()


@dataclass(frozen=True)
class CorruptionScore:
    """Mean accuracy under corruptions on the first ``images`` val rows (seeded by ``seed``):
    a search's corruption column, scored on the teacher and on every trial with the same
    images so the drop is fair. ``every_epoch``: also scored after each fine-tuning epoch
    (``val_corruption_accuracy``), so the scheduler can hold ``--max-corruption-drop``;
    the corrupted copies are made once (:meth:`copies`) and scored each epoch."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int
    seed: int
    every_epoch: bool = False

    def copies(self, val: dict[str, Any]) -> Batches:
        """The corrupted copies of the val arrays' first ``images`` rows as (images, labels)
        batches: made once and kept when they fit :data:`KEPT_BYTES`, else made on each pass."""
        make = lambda: corrupted_batches(val, self.corruptions, self.severities, seed=self.seed, images=self.images)  # noqa: E731
        n = min(self.images, len(val["label"])) if self.images > 0 else len(val["label"])
        size = n * len(self.corruptions) * len(self.severities) * int(np.prod(val["image"].shape[1:]))
        return list(make()) if size <= KEPT_BYTES else _Remade(make)

    def score(self, model: Any, val: dict[str, Any], meta: dict[str, Any]) -> float:
        """Mean accuracy of ``model`` over the corrupted copies of the val arrays."""
        return batches_accuracy(model, self.copies(val), meta)


def corrupted_batches(
    arrays: dict[str, np.ndarray],
    names: Sequence[str],
    severities: Sequence[int],
    *,
    seed: int = 0,
    images: int = 0,
    batch_size: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (corruption, severity) copy of the first ``images`` rows of a split's decoded
    ``arrays`` (0 = all), as (uint8 images, labels) batches: the images
    :func:`effray.evaluate.robustness.robustness` streams (each seeded by its row id)."""
    n = len(arrays["label"]) if images <= 0 else min(images, len(arrays["label"]))
    rows, clean, labels = arrays["index"][:n], arrays["image"][:n], np.asarray(arrays["label"][:n], np.int64)
    for name in names:
        for s in severities:
            for i in range(0, n, batch_size):
                yield (
                    corrupt(clean[i : i + batch_size], name, s, seed=seed, rows=rows[i : i + batch_size]),
                    labels[i : i + batch_size],
                )


def batches_accuracy(model: Any, batches: Batches, meta: dict[str, Any]) -> float:
    """Accuracy of ``model`` (put in eval mode) over uint8 ``batches``, preprocessed and
    normalised as its validation is; NaN when there are none."""
    model.eval()
    predict = lambda x: predict_logits(model, x, meta["mean"], meta["std"], preprocess=meta.get("preprocess"))  # noqa: E731
    scores = score_batches(predict, batches, int(meta["num_classes"]))
    return scores["accuracy"] if scores["count"] else float("nan")
