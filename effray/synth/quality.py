"""How good are the synthetic images, measured with *our own* classifier (no downloads).

- **class consistency**: accuracy of a classifier trained on real data when it labels
  the synthetic images with the class they were generated for;
- **diversity**: mean pairwise distance between the classifier's penultimate features
  of same-class synthetic images, divided by the same on real images (1 = as diverse
  as real data, near 0 = mode collapse);
- **FID-style distance**: the Fréchet distance between Gaussians fitted to the
  penultimate features (the input of the final linear layer) of real and synthetic
  images. It is *not* Inception FID and not comparable to published FIDs: it depends on
  our classifier, its feature size and the sample size. ``fid_style_real_reference``,
  real train rows vs the real split at the same sample size, is its floor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray.config import require
from effray.data.arrays import prepared_batches
from effray.data.prepare import load_meta
from effray.metrics import score_batches
from effray.models.predict import last_linear, predict_logits
from effray.train.checkpoint import load_checkpoint


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as the trace of the square root of the symmetric
    PSD ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues), so only ``eigh`` is needed."""
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def feature_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean L2 distance over all distinct pairs of rows."""
    n = len(features)
    if n < 2:
        return float("nan")
    x = torch.from_numpy(np.asarray(features, np.float64))
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))


def diversity_ratio(
    syn: np.ndarray, syn_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray, num_classes: int
) -> tuple[float, list[float | None]]:
    """Per class: synthetic mean pairwise distance / real mean pairwise distance; and their mean."""
    per: list[float | None] = []
    for c in range(num_classes):
        s, r = syn[syn_labels == c], real[real_labels == c]
        per.append(mean_pairwise_distance(s) / mean_pairwise_distance(r) if len(s) > 1 and len(r) > 1 else None)
    valid = [p for p in per if p is not None and np.isfinite(p)]
    return (float(np.mean(valid)) if valid else float("nan")), per


def features_and_scores(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    mean: list[float],
    std: list[float],
    batch_size: int = 500,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Penultimate features (the final linear layer's input) of uint8 NHWC images, and the
    model's scores on their labels (:func:`effray.metrics.score_batches`: accuracy and
    per-class accuracy), from one forward pass."""
    grabbed: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].detach().flatten(1)))
    model.eval()
    try:
        scores = score_batches(
            lambda x: predict_logits(model, x, mean, std),
            ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)),
            num_classes,
        )
    finally:
        hook.remove()
    return torch.cat(grabbed).double().cpu().numpy(), scores


def _read(data_dir: str, split: str, max_rows: int) -> tuple[np.ndarray, np.ndarray]:

    images, labels, n = [], [], 0
    for x, y in prepared_batches(data_dir, split, 1000)[1]:
        images.append(x)
        labels.append(y)
        n += len(y)
        if n >= max_rows:
            break
    require(n > 1, f"{data_dir} split {split!r} has fewer than 2 rows")
    return np.concatenate(images)[:max_rows], np.concatenate(labels)[:max_rows]


def score_synthetic(
    synthetic: str, classifier: str, real: str, split: str = "val", max_rows: int = 5000
) -> dict[str, Any]:
    """The three figures (plus the real-data references they are read against)."""

    model, payload = load_checkpoint(classifier)
    info = payload.get("data") or {}
    require(
        "mean" in info,
        f"checkpoint {classifier} has no data normalisation; pass a checkpoint from effray train",
    )
    num_classes = int(info["num_classes"])
    syn_meta, real_meta = load_meta(synthetic), load_meta(real)
    require(
        syn_meta["num_classes"] == num_classes == real_meta["num_classes"],
        f"classifier ({num_classes}), synthetic ({syn_meta['num_classes']}) and real ({real_meta['num_classes']}) "
        "class counts differ",
    )
    syn_x, syn_y = _read(synthetic, "train", max_rows)
    real_x, real_y = _read(real, split, max_rows)
    n = min(len(syn_y), len(real_y))
    syn_y, real_y = syn_y[:n], real_y[:n]
    syn_f, syn_scores = features_and_scores(model, syn_x[:n], syn_y, num_classes, info["mean"], info["std"])
    real_f, real_scores = features_and_scores(model, real_x[:n], real_y, num_classes, info["mean"], info["std"])
    diversity, per_class_div = diversity_ratio(syn_f, syn_y, real_f, real_y, num_classes)
    result: dict[str, Any] = {
        "rows": n,
        "class_consistency": syn_scores["accuracy"],
        "class_consistency_per_class": syn_scores["per_class"],
        "classifier_real_accuracy": real_scores["accuracy"],
        "diversity_ratio": diversity,
        "diversity_ratio_per_class": per_class_div,
        "fid_style": feature_frechet(real_f, syn_f),
        "feature_dim": int(syn_f.shape[1]),
        "real_split": split,
        "note": "FID-style = Fréchet distance of OUR classifier's penultimate features, not Inception FID",
    }
    if split != "train" and "train" in real_meta["splits"]:
        train_x, train_y = _read(real, "train", n)
        if len(train_x) == n:
            train_f, _ = features_and_scores(model, train_x, train_y, num_classes, info["mean"], info["std"])
            result["fid_style_real_reference"] = feature_frechet(real_f, train_f)
    return result


def score(cfg: Any) -> dict[str, Any]:
    """`effray synth score`: the figures for an existing synthetic dataset."""
    result = score_synthetic(cfg.synthetic, cfg.classifier, cfg.real, cfg.split, cfg.max_rows)
    return {**result, "synthetic": cfg.synthetic, "classifier": cfg.classifier, "real": cfg.real}
