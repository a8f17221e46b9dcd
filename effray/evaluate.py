"""``effray evaluate``: accuracy, loss, per-class precision/recall/F1, confusion and
calibration (:mod:`effray.metrics`) of any checkpoint on any data; ``--out`` draws them.

Data is either a prepared dataset (``effray data prepare``; raw pixels, a split) or
Parquet with encoded image bytes + label (the shared ``cifar10-train.parquet`` schema).
The checkpoint is opened by :func:`effray.train.checkpoint.load_checkpoint`, which
dispatches on the payload's ``format``: a compressed artifact evaluates the same way
once its stage registers its format. Runs in-process, without Ray: one model, one pass.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import write_json
from effray.config import option, require
from effray.errors import EffrayError
from effray.metrics import classification_metrics, write_figures
from effray.predict import predict_logits, tta_logits  # noqa: F401  (tta_logits: part of this module's API)

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class EvaluateConfig:
    """Which checkpoint on which data."""

    checkpoint: str = option("", "checkpoint directory (or its model.pt) from effray train")
    data: str = option("", "a prepared dataset directory, or Parquet (file or folder) with encoded image bytes + label")
    batch_size: int = option(500, "images per forward pass")
    split: str = option("val", "split to evaluate when --data is a prepared dataset")
    tta: int = option(
        -1,
        "test-time augmentation: -1 = the level the run validated with, 0 none, 1 mirror, 2 mirror + 1-pixel "
        "translations",
        choices=(-1, 0, 1, 2),
    )
    out: str = option("", "directory for metrics.json, confusion.png and reliability.png ('' = print only)")
    corruptions: str = option(
        "",
        "corruption robustness on Ray Data: 'all' or a comma-separated list (gaussian_noise, contrast, ...); '' = none",
    )
    severities: str = option("1,2,3,4,5", "corruption severities to score (1-5)")
    corruption_seed: int = option(
        0, "seed of the corruptions' randomness (per image, so any batching gives the same split)"
    )

    def validate(self) -> None:
        require(bool(self.checkpoint), "--checkpoint PATH is required (a run's checkpoint directory or model.pt)")
        require(bool(self.data), "--data is required (a prepared dataset directory or a Parquet file)")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.tta in (-1, 0, 1, 2), f"--tta must be -1, 0, 1 or 2, got {self.tta}")
        if self.corruptions:
            from effray.data.corrupt import parse_corruptions
            from effray.robustness import parse_severities

            parse_corruptions(self.corruptions)
            parse_severities(self.severities)
            require(
                (Path(self.data) / "meta.json").is_file(),
                f"--corruptions needs a prepared dataset (effray data prepare), not {self.data!r}",
            )


def _plugins() -> None:
    """Import the stages that register checkpoint formats (compression, the GAN
    generator), when installed; a stage that is present but broken fails loudly."""
    for mod in ("effray.compress", "effray.synth"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """:func:`effray.train.checkpoint.load_checkpoint` with every stage's format registered:
    ``(model in eval mode, payload)`` for a trained checkpoint or a compressed artifact."""
    from effray.train.checkpoint import load_checkpoint as load

    _plugins()
    return load(path)


def prepared_batches(data_dir: str | os.PathLike, split: str, batch_size: int) -> tuple[dict[str, Any], Batches]:
    """(meta, batches of uint8 NHWC images + int64 labels) of one split of a prepared dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from effray.data.pipeline import decode_batch
    from effray.data.prepare import load_meta, split_files

    meta = load_meta(data_dir)
    files, shape = split_files(data_dir, split), tuple(meta["image_shape"])

    def gen() -> Batches:
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
                batch = decode_batch(pa.Table.from_batches([rb]), shape)  # the pipeline's own decode
                yield batch["image"].copy(), batch["label"]

    return meta, gen()


def encoded_batches(path: str | os.PathLike, channels: int, counter: dict[str, int]) -> Batches:
    """Batches from Parquet with encoded image bytes + label; unreadable rows are skipped
    and counted in ``counter["skipped_bad"]``."""
    from effray.data.sources import load_chunk, plan_source

    plan = plan_source(f"parquet:{path}")
    for chunk in plan.chunks:
        decoded, labels = load_chunk(chunk, channels)
        ok = [i for i, e in enumerate(decoded.errors) if not e]
        counter["skipped_bad"] += len(decoded.errors) - len(ok)
        if ok:
            shapes = {decoded.images[i].shape for i in ok}
            require(len(shapes) == 1, f"{path} mixes image sizes {sorted(shapes)}; evaluate one size at a time")
            yield np.stack([decoded.images[i] for i in ok]), labels[ok]


def score(
    model: Any,
    batches: Batches,
    mean: list[float],
    std: list[float],
    num_classes: int,
    batch_size: int,
    image_shape: list[int] | None = None,
    tta: int = 0,
    numerics: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class accuracy and the logits and labels (CPU, for
    :func:`effray.metrics.classification_metrics`) of ``model`` over ``batches``,
    normalised exactly as training normalised its validation batches and computed with
    the checkpoint's ``numerics`` (bf16 autocast, channels-last) as training scored it."""
    import torch
    import torch.nn.functional as F

    numerics = numerics or {}
    channels_last = bool(numerics.get("channels_last"))
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    correct = loss = 0.0
    per_ok, per_n = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    all_logits, all_labels = [], []
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            if image_shape is not None and list(images.shape[1:]) != list(image_shape):
                raise EffrayError(
                    f"images are {list(images.shape[1:])} (HWC), the model was trained on {list(image_shape)}"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise EffrayError(
                    f"data has label {int(labels.max())}, the checkpoint's model predicts {num_classes} classes; "
                    "it belongs to another dataset"
                )
            for i in range(0, len(labels), batch_size):
                y = torch.from_numpy(np.array(labels[i : i + batch_size]))  # Ray's arrays are read-only
                logits = predict_logits(model, images[i : i + batch_size], mean, std, tta, numerics)
                pred = logits.argmax(dim=1)
                correct += float((pred == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                per_ok += np.bincount(y[pred == y].numpy(), minlength=num_classes)
                per_n += np.bincount(y.numpy(), minlength=num_classes)
                all_logits.append(logits.float().cpu())
                all_labels.append(y)
    count = int(per_n.sum())
    require(count > 0, "no images to evaluate (empty split or every row unreadable)")
    return {
        "accuracy": correct / count,
        "loss": loss / count,
        "count": count,
        "per_class": [float(o / n) if n else None for o, n in zip(per_ok, per_n)],
        "logits": torch.cat(all_logits),
        "labels": torch.cat(all_labels),
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load the checkpoint, stream the data, return one JSON-able result dict."""
    model, payload = load_checkpoint(cfg.checkpoint)
    spec, info = payload.get("model_spec", {}), payload.get("data")
    if not info or "mean" not in info:
        raise EffrayError(
            f"checkpoint {cfg.checkpoint} (format {payload['format']}) has no data normalisation; can't evaluate it"
        )
    num_classes = int(spec.get("num_classes", info["num_classes"]))
    classes = list(info.get("classes") or range(num_classes))
    counter = {"skipped_bad": 0}
    data = Path(cfg.data)
    if (data / "meta.json").is_file():
        meta, batches = prepared_batches(data, cfg.split, cfg.batch_size)
        require(
            int(meta["num_classes"]) == num_classes,
            f"checkpoint {cfg.checkpoint} is a {num_classes}-class {spec.get('name', 'model')}, "
            f"dataset {cfg.data} has {meta['num_classes']} classes: a checkpoint from another model/dataset",
        )
        where = {"split": cfg.split}
    else:
        require(data.exists(), f"--data {cfg.data!r} does not exist")
        batches = encoded_batches(data, int(info["image_shape"][2]), counter)
        where = {}
    tta = cfg.tta if cfg.tta >= 0 else int((payload.get("config") or {}).get("tta", 0))
    result = score(
        model,
        batches,
        info["mean"],
        info["std"],
        num_classes,
        cfg.batch_size,
        info.get("image_shape"),
        tta,
        payload.get("numerics"),
    )
    scores = classification_metrics(result["logits"], result["labels"], [str(c) for c in classes])
    out = {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "count": result["count"],
        "per_class_accuracy": dict(zip([str(c) for c in classes], result["per_class"])),
        **{
            k: scores[k]
            for k in ("nll", "ece", "macro_f1", "worst_class_recall", "worst_class", "per_class", "confusion")
        },
        "checkpoint": os.path.abspath(cfg.checkpoint),
        "data": os.path.abspath(cfg.data),
        **where,
        "model": spec.get("name"),
        "format": payload["format"],
        "skipped_bad": counter["skipped_bad"],
        "tta": tta,
        "numerics": payload.get("numerics") or {"bf16": False, "channels_last": False},
    }
    if cfg.corruptions:
        from effray.data.corrupt import parse_corruptions
        from effray.robustness import parse_severities, robustness

        out["robustness"] = robustness(
            model,
            data,
            cfg.split,
            info,
            parse_corruptions(cfg.corruptions),
            parse_severities(cfg.severities),
            clean_accuracy=result["accuracy"],
            seed=cfg.corruption_seed,
            batch_size=cfg.batch_size,
            tta=tta,
            numerics=payload.get("numerics"),
        )
        out["mean_corruption_accuracy"] = out["robustness"]["mean_corruption_accuracy"]
    if cfg.out:
        out["figures"] = write_figures(scores, cfg.out, title=str(spec.get("name") or ""))
        write_json(Path(cfg.out) / "metrics.json", {**out, "reliability": scores["reliability"]})
    return out
