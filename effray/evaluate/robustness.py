"""Corruption robustness of a model: accuracy under every corruption and severity.

The evaluation split streams once through Ray Data; one ``map_batches`` stage makes every
(corruption, severity) copy of each batch (:mod:`effray.data.corrupt`, seeded per row, so
the corrupted split is the same on every run and every cluster), and the driver scores
them as they arrive. Reported as CIFAR-10-C reports it: accuracy per corruption and
severity, the mean over all of them (mean corruption accuracy), and its drop relative
to the clean accuracy, so models of different clean accuracy compare fairly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from effray.data.corrupt import CORRUPTIONS, corrupt
from effray.data.pipeline import eval_dataset, map_batch_rows
from effray.data.prepare import load_meta
from effray.errors import EffrayError
from effray.metrics import class_sums, sums_metrics, sums_size
from effray.models.predict import predict_logits


def all_variants(
    batch: dict[str, np.ndarray], names: Sequence[str], severities: Sequence[int], seed: int
) -> dict[str, np.ndarray]:
    """A decoded batch -> every (corruption, severity) copy of it, tagged by ``variant``
    (the position in ``names`` x ``severities``). A Ray Data batch function."""
    images, rows = batch["image"], batch["index"]
    parts = [corrupt(images, n, s, seed=seed, rows=rows) for n in names for s in severities]
    k = len(parts)
    return {
        "image": np.concatenate(parts) if parts else images[:0],
        "label": np.tile(batch["label"], k),
        "variant": np.repeat(np.arange(k, dtype=np.int32), len(images)),
    }


@torch.no_grad()
def variant_scores(
    model: Any,
    batches: Iterable[dict[str, np.ndarray]],
    variants: int,
    info: dict[str, Any],
    tta: int = 0,
    numerics: dict[str, bool] | None = None,
) -> list[dict[str, Any]]:
    """:func:`effray.metrics.sums_metrics` of each variant of ``batches`` (rows tagged by
    ``variant``, mixed within a batch): one forward per batch, the rows of each variant
    gathered on the model's device by an index of known size and counted by
    :func:`effray.metrics.class_sums`, the sums read back at the end."""
    model.eval()
    sums: dict[int, torch.Tensor] = {}
    classes = 0
    for batch in batches:
        logits = predict_logits(model, batch["image"], info["mean"], info["std"], tta, numerics, info.get("preprocess"))
        classes = logits.shape[1]
        labels = torch.from_numpy(np.array(batch["label"], np.int64))  # a copy: Ray's arrays are read-only
        for v in np.unique(batch["variant"]).tolist():
            rows = torch.from_numpy(np.flatnonzero(batch["variant"] == v))
            counted = class_sums(logits[rows.to(logits.device)], labels[rows], classes)
            sums[v] = sums[v] + counted if v in sums else counted
    empty = torch.zeros(sums_size(classes), dtype=torch.float64)
    return [sums_metrics(sums.get(v, empty), classes) for v in range(variants)]


def robustness(
    model: Any,
    data_dir: str | os.PathLike,
    split: str,
    info: dict[str, Any],
    names: Sequence[str],
    severities: Sequence[int],
    *,
    clean_accuracy: float,
    seed: int = 0,
    batch_size: int = 500,
    tta: int = 0,
    numerics: dict[str, bool] | None = None,
    num_cpus: float = 1.0,
) -> dict[str, Any]:
    """Accuracy of ``model`` under each corruption at each severity, on Ray Data.

    ``info`` is the checkpoint's data summary (normalisation); ``clean_accuracy`` the
    model's on the same split, for the relative drop."""
    for n in names:
        if n not in CORRUPTIONS:
            raise EffrayError(f"unknown corruption {n!r}; valid: {', '.join(CORRUPTIONS)}")
    meta = load_meta(data_dir)
    if int(meta["image_shape"][2]) != 3 and any(n in ("brightness", "saturate") for n in names):
        raise EffrayError("brightness and saturate need RGB images; pass --corruptions without them")
    keys = [(n, s) for n in names for s in severities]
    per_map = max(1, map_batch_rows(meta) // max(len(keys), 1))  # rows in, len(keys) x rows out
    ds = eval_dataset(data_dir, split).map_batches(
        all_variants,
        batch_size=per_map,
        batch_format="numpy",
        num_cpus=num_cpus,
        fn_kwargs={"names": list(names), "severities": list(severities), "seed": int(seed)},
    )
    scores = variant_scores(
        model, ds.iter_batches(batch_size=batch_size, batch_format="numpy"), len(keys), info, tta, numerics
    )
    count = np.array([s["count"] for s in scores])
    if not count.all():
        raise EffrayError(f"split {split!r} of {data_dir} has no images to corrupt")
    acc = np.array([s["accuracy"] for s in scores])
    table = {n: {str(s): float(acc[keys.index((n, s))]) for s in severities} for n in names}
    mean = float(acc.mean())
    return {
        "corruption_accuracy": table,
        "per_corruption": {n: float(np.mean(list(v.values()))) for n, v in table.items()},
        "mean_corruption_accuracy": mean,
        "clean_accuracy": float(clean_accuracy),
        "relative_drop": (clean_accuracy - mean) / clean_accuracy if clean_accuracy > 0 else None,
        "severities": list(severities),
        "images": int(count[0]),
        "seed": int(seed),
    }
