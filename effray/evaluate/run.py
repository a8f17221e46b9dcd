"""``effray evaluate``: accuracy, loss, per-class precision/recall/F1, confusion and
calibration (:mod:`effray.metrics`) of any checkpoint on any data; ``--out`` draws them.

Data is either a prepared dataset (``effray data prepare``; raw pixels, a split) or
Parquet with encoded image bytes + label (the shared ``cifar10-train.parquet`` schema).
The checkpoint is opened by :func:`effray.train.checkpoint.load_checkpoint`, which
dispatches on the payload's ``format``: a compressed artifact evaluates the same way
(importing :mod:`effray.compress` registers its formats). The clean score runs
in-process, without Ray: one model, one pass (:func:`effray.metrics.score_batches`). An
artifact records the temperature fitted when it was measured; its ECE and NLL are given
before and after that T (``ece_scaled``, ``nll_scaled``), T applied as recorded, not refitted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray.atomic import write_json
from effray.compress.artifact import temperature_of
from effray.config import option, require
from effray.console import say
from effray.data.arrays import encoded_batches, prepared_batches
from effray.data.corrupt import parse_corruptions, parse_severities
from effray.errors import EffrayError
from effray.evaluate.robustness import robustness
from effray.metrics import classification_metrics, scaled_calibration, score_batches, write_figures
from effray.models.predict import predict_logits
from effray.train.checkpoint import load_checkpoint

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
    trust_code: bool = option(
        False, "import the pkg.module:factory the checkpoint names to rebuild its model (never on a file's say-so)"
    )

    def validate(self) -> None:
        require(bool(self.checkpoint), "--checkpoint PATH is required (a run's checkpoint directory or model.pt)")
        require(bool(self.data), "--data is required (a prepared dataset directory or a Parquet file)")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.tta in (-1, 0, 1, 2), f"--tta must be -1, 0, 1 or 2, got {self.tta}")
        if self.corruptions:
            parse_corruptions(self.corruptions)
            parse_severities(self.severities)
            require(
                (Path(self.data) / "meta.json").is_file(),
                f"--corruptions needs a prepared dataset (effray data prepare), not {self.data!r}",
            )


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
    preprocess: str | None = None,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class accuracy and the logits and labels (CPU, for
    :func:`effray.metrics.classification_metrics`) of ``model`` over ``batches`` of uint8
    images, preprocessed (the model's ``preprocess``: images of another size than it takes)
    and normalised exactly as training did its validation batches, and computed with the
    checkpoint's ``numerics`` (bf16 autocast, channels-last) as training scored it. Without
    a preprocessing (checkpoints from before it was recorded) images of another size than
    ``image_shape`` are an error."""
    numerics = numerics or {}
    channels_last = bool(numerics.get("channels_last"))
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()

    def checked() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for images, labels in batches:
            if not preprocess and image_shape is not None and list(images.shape[1:]) != list(image_shape):
                raise EffrayError(
                    f"images are {list(images.shape[1:])} (HWC), the model was trained on {list(image_shape)}"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise EffrayError(
                    f"data has label {int(labels.max())}, the checkpoint's model predicts {num_classes} classes; "
                    "it belongs to another dataset"
                )
            for i in range(0, len(labels), batch_size):
                yield images[i : i + batch_size], torch.from_numpy(np.array(labels[i : i + batch_size]))

    def predict(images: np.ndarray) -> torch.Tensor:
        return predict_logits(model, images, mean, std, tta, numerics, preprocess)

    result = score_batches(predict, checked(), num_classes, keep_logits=True)
    require(result["count"] > 0, "no images to evaluate (empty split or every row unreadable)")
    return result


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load the checkpoint, stream the data, return one JSON-able result dict."""
    model, payload = load_checkpoint(cfg.checkpoint, cfg.trust_code)
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
        batches = encoded_batches(data, int(info["image_shape"][2]), counter, info.get("preprocess"))
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
        info.get("preprocess"),
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
    if "temperature" in payload:  # an artifact: ECE and NLL after its recorded temperature, beside before
        out.update(scaled_calibration(result["logits"], result["labels"], classes, temperature_of(payload)))
        say(
            f"[effray] ECE {out['ece']:.4f} -> {out['ece_scaled']:.4f}, NLL {out['nll']:.4f} -> "
            f"{out['nll_scaled']:.4f} with the temperature the model records ({out['temperature']:.4g})"
        )
    if cfg.corruptions:
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
