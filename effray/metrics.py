"""The one metrics pass, and what accuracy hides: per-class precision/recall/F1,
confusion, calibration and NLL.

:func:`score_batches` is the pass every stage scores a model with (training's validation,
compression's measurement, ``effray evaluate``, robustness, cleaning's folds, export's
parity): counts summed on the model's device by :func:`class_sums` (:func:`device_pass`),
read once at the end.

Pruned and low-bit models lose more on rare classes and in calibration than their top-1
accuracy shows (Hooker et al. 2019), so ``effray evaluate`` and every search trial report
these next to accuracy. The counting is torchmetrics' (multiclass precision, recall, F1,
confusion matrix and the 15-bin L1 calibration error of Guo et al. 2017); this module
only gathers them into one JSON-able dict and draws the two figures. A class the model
never predicts has precision 0 (torchmetrics' ``zero_division=0``), so macro scores are
not inflated by classes that were given up.

:func:`scaled_calibration` is post-hoc temperature scaling (Guo et al. 2017): one scalar
T fitted by NLL on labelled logits, which rescales the confidence without moving any
prediction, and the ECE and NLL once scaled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# the temperatures :func:`fit_temperature` searches: wide enough for any recipe's over- or
# under-confidence, bounded so a set it can't fault (all right) gets a finite sharpening
TEMPERATURE_RANGE = (0.05, 20.0)
# the temperatures the one pass also scores calibration at, log-spaced over that range with 1
# in the middle: their NLLs pick an epoch's T and their bins give its ECE, all as sums that
# add over batches and ranks (the exact fit needs the logits: :func:`scaled_calibration`)
GRID_TEMPERATURES = tuple(
    math.exp(math.log(TEMPERATURE_RANGE[0]) + k * math.log(TEMPERATURE_RANGE[1] / TEMPERATURE_RANGE[0]) / 32)
    for k in range(33)
)
_CALIBRATION = len(GRID_TEMPERATURES) * (1 + 3 * ECE_BINS)  # per T: NLL sum; per bin: count, confidence, hits
_GRID_ELEMENTS = 1 << 22  # scaled logits held at once: a CIFAR batch's 33 temperatures, fewer of many classes
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def sums_size(num_classes: int) -> int:
    """The length of :func:`class_sums`' tensor for ``num_classes`` classes."""
    return 2 + 2 * num_classes + _CALIBRATION


def class_sums(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[correct, loss sum, correct per class..., count per class..., calibration...]`` of
    one batch as a float64 tensor on the logits' device (:func:`calibration_sums` last):
    fixed-size scatter adds, no boolean indexing or ``bincount`` (their output size depends
    on the data: a host sync on a GPU)."""
    labels = labels.to(logits.device, non_blocking=True)
    hit = (logits.argmax(dim=1) == labels).double()
    loss = F.cross_entropy(logits.float(), labels, reduction="sum").double()
    zeros = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    per_ok = zeros.index_add(0, labels, hit)
    per_n = zeros.index_add(0, labels, torch.ones_like(hit))
    return torch.cat([hit.sum().view(1), loss.view(1), per_ok, per_n, calibration_sums(logits, labels, hit)])


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """For each of :data:`GRID_TEMPERATURES` T: the NLL sum of ``softmax(logits / T)`` and,
    in each of the ECE's bins of its confidence (torchmetrics' ``[lo, hi)`` bins), the
    count, the confidence sum and the hits (``hit``: 1 where the top class is right)."""
    per = max(1, _GRID_ELEMENTS // max(1, logits.numel()))  # temperatures per chunk: bounded memory
    temps = torch.tensor(GRID_TEMPERATURES, dtype=torch.float32, device=logits.device)
    return torch.cat([_calibration_chunk(logits, labels, hit, t) for t in temps.split(per)]).flatten()


def _calibration_chunk(
    logits: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor, temps: torch.Tensor
) -> torch.Tensor:
    """:func:`calibration_sums`' rows for the temperatures ``temps``: ``(len(temps), 1 + 3 * bins)``."""
    grid, bins = len(temps), ECE_BINS
    logp = (logits.float().unsqueeze(0) / temps.view(-1, 1, 1)).log_softmax(-1)  # (T, N, C)
    nll = -logp.gather(2, labels.view(1, -1, 1).expand(grid, -1, 1)).sum(dim=(1, 2))
    confidence = logp.amax(-1).exp()  # (T, N)
    offsets = bins * torch.arange(grid, device=logits.device).view(-1, 1)
    where = ((confidence * bins).long().clamp(max=bins - 1) + offsets).flatten()
    zeros = torch.zeros(grid * bins, dtype=torch.float64, device=logits.device)
    counted = [
        zeros.index_add(0, where, v.double().flatten()).view(grid, bins)
        for v in (torch.ones_like(confidence), confidence, hit.view(1, -1).expand(grid, -1))
    ]
    return torch.cat([nll.double().view(-1, 1), *counted], dim=1)


def sums_metrics(sums: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The one host read of :func:`class_sums` (added over batches and ranks): accuracy,
    mean loss, count and per-class accuracy (None for a class with no rows)."""
    sums = sums.cpu()
    correct, loss, per_ok = sums[0], sums[1], sums[2 : 2 + num_classes]
    per_n = sums[2 + num_classes : 2 + 2 * num_classes]
    count = float(per_n.sum())
    return {
        "accuracy": float(correct) / max(count, 1.0),
        "loss": float(loss) / max(count, 1.0),
        "count": int(count),
        "per_class": [float(o / n) if n else None for o, n in zip(per_ok, per_n)],
        **grid_calibration(sums[2 + 2 * num_classes :], count),
    }


def grid_calibration(sums: torch.Tensor, count: float) -> dict[str, float]:
    """From :func:`calibration_sums` (added up): ``ece`` at T = 1, and the grid temperature
    with the least NLL (``temperature``) with its ``ece_scaled`` and ``nll_scaled``: the
    temperature scaling of :func:`scaled_calibration`, on the grid (NaN without rows)."""
    if count <= 0:
        return {"ece": math.nan, "temperature": 1.0, "ece_scaled": math.nan, "nll_scaled": math.nan}
    bins = ECE_BINS
    cal = sums.view(len(GRID_TEMPERATURES), 1 + 3 * bins)
    ece = (cal[:, 1 + bins : 1 + 2 * bins] - cal[:, 1 + 2 * bins :]).abs().sum(1) / count
    best = int(cal[:, 0].argmin())
    return {
        "ece": float(ece[len(GRID_TEMPERATURES) // 2]),
        "temperature": GRID_TEMPERATURES[best],
        "ece_scaled": float(ece[best]),
        "nll_scaled": float(cal[best, 0]) / count,
    }


def worst_recall(per_class: list[float | None]) -> float:
    """The lowest recall of the classes with rows (NaN when none has)."""
    present = [r for r in per_class if r is not None]
    return min(present) if present else float("nan")


@torch.no_grad()
def device_pass(
    predict: Callable[[Any], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
    num_classes: int | None = None,
    *,
    keep_logits: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The pass itself, with no host read: ``(sums, logits, labels)``, the
    :func:`class_sums` of ``predict(images)`` added over ``(images, labels)`` batches and,
    with ``keep_logits``, every batch's float logits and labels concatenated, all on the
    logits' device (``None`` for no batches). ``num_classes`` None: the logits' width."""
    sums: torch.Tensor | None = None
    kept_logits, kept_labels = [], []
    for images, labels in batches:
        labels = labels if torch.is_tensor(labels) else torch.as_tensor(labels)
        if len(labels) == 0:  # a shape, known on the host
            continue
        out = predict(images)
        batch = class_sums(out, labels, num_classes if num_classes is not None else out.shape[1])
        sums = batch if sums is None else sums + batch
        if keep_logits:
            kept_logits.append(out.float())
            kept_labels.append(labels.to(out.device, non_blocking=True).long())
    if not kept_logits:
        return sums, None, None
    return sums, torch.cat(kept_logits), torch.cat(kept_labels)


def score_batches(
    predict: Callable[[Any], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
    num_classes: int | None,
    *,
    keep_logits: bool = False,
) -> dict[str, Any]:
    """:func:`sums_metrics` of ``predict(images)`` over ``(images, labels)`` batches: the
    :func:`device_pass`, then its one host read; with ``keep_logits`` also the logits and
    labels on the CPU (for :func:`classification_metrics`). ``num_classes`` None: the
    logits' width (0 when there are no batches)."""
    sums, logits, labels = device_pass(predict, batches, num_classes, keep_logits=keep_logits)
    if sums is None:
        sums = torch.zeros(sums_size(num_classes or 0), dtype=torch.float64)
    classes = (len(sums) - sums_size(0)) // 2
    result = sums_metrics(sums, classes)
    if keep_logits:
        result["logits"] = logits.cpu() if logits is not None else torch.zeros(0, classes)
        result["labels"] = labels.cpu() if labels is not None else torch.zeros(0, dtype=torch.long)
    return result


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Every score of one model on one labelled set, from its ``(N, C)`` logits (any device)."""
    from torchmetrics.functional.classification import (
        multiclass_calibration_error,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    c = len(classes)
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    if logits.dim() != 2 or logits.shape[1] != c or len(labels) != len(logits):
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} don't match {c} classes")
    probs = logits.softmax(dim=1)
    kw = {"num_classes": c, "average": "none", "validate_args": False}
    precision, recall, f1 = (
        m(probs, labels, **kw) for m in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    )
    present = torch.bincount(labels, minlength=c) > 0  # a class absent from the data has no recall to be worst at
    names = [str(n) for n in classes]
    return {
        "accuracy": float((probs.argmax(1) == labels).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=c, n_bins=ECE_BINS, norm="l1")),
        "macro_f1": float(f1[present].mean()),
        "worst_class_recall": float(recall[present].min()),
        "worst_class": names[int(torch.where(present, recall, torch.inf).argmin())],
        "per_class": {
            n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, torch.bincount(labels, minlength=c))
        },
        "confusion": multiclass_confusion_matrix(probs, labels, num_classes=c).tolist(),  # rows: true, cols: predicted
        "reliability": reliability_bins(probs, labels),
        "classes": names,
    }


@torch.no_grad()
def temperature_tensor(
    logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = TEMPERATURE_RANGE, steps: int = 48
) -> torch.Tensor:
    """The T > 0 minimising the NLL of ``softmax(logits / T)`` on labelled ``(N, C)`` logits,
    as a 0-dim float64 tensor on the logits' device, with no host read.

    The NLL is convex in 1/T, so unimodal in log T: a golden-section search over log T in
    ``bounds``, its bracket narrowed by ``torch.where``, finds it deterministically. T = 1
    is kept when the fit does not lower the NLL (logits that carry no information, such as
    all equal, or no rows); a row with a non-finite logit (a diverged model) weighs nothing."""
    if logits.dim() != 2 or len(labels) != len(logits):
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} don't match")
    finite = torch.isfinite(logits.detach()).all(dim=1)
    z = torch.where(finite[:, None], logits.detach().double(), 0.0)
    y = labels.detach().long().to(z.device, non_blocking=True)
    weight = finite.double() / finite.sum().clamp_min(1)

    def nll(log_t: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(z / log_t.exp(), y, reduction="none") * weight).sum()

    lo = torch.full((), math.log(bounds[0]), dtype=torch.float64, device=z.device)
    hi = torch.full((), math.log(bounds[1]), dtype=torch.float64, device=z.device)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(steps):  # keep the side of the smaller NLL; one new evaluation per step
        left = fa <= fb
        lo, hi = torch.where(left, lo, a), torch.where(left, b, hi)
        new = torch.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
        fnew = nll(new)
        a, b, fa, fb = (
            torch.where(left, new, b),
            torch.where(left, a, new),
            torch.where(left, fnew, fb),
            torch.where(left, fa, fnew),
        )
    best = torch.where(fa <= fb, a, b)
    one = nll(torch.zeros_like(best))
    kept = nll(best) < one - 1e-9 * (1.0 + one.abs())  # a fit that buys nothing changes nothing
    return torch.where(kept, best.exp(), torch.ones_like(best))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`temperature_tensor`, read once: post-hoc temperature scaling's T (Guo et al. 2017)."""
    return float(temperature_tensor(logits, labels))


def scaled_calibration(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None, temperature: float | None = None
) -> dict[str, float]:
    """``temperature``, ``ece_scaled`` and ``nll_scaled``: T fitted on these logits
    (:func:`fit_temperature`), or a recorded one applied to new data, and the ECE and NLL of
    ``softmax(logits / T)`` as :func:`classification_metrics` scores them. Fitted and scored
    on the same rows the scores are optimistic: they say what T can do, not what it will."""
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(logits.shape[1])]
    t = fit_temperature(logits, labels) if temperature is None else float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    after = classification_metrics(logits.detach().float() / t, labels, names)
    return {"temperature": t, "ece_scaled": after["ece"], "nll_scaled": after["nll"]}


def accuracy_interval(correct: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``count`` (95 % at
    z = 1.96): unlike the normal approximation it stays inside [0, 1] and holds near 0 and 1,
    where compressed models' error rates on a few thousand images sit. ``(nan, nan)`` for no rows."""
    if count <= 0:
        return float("nan"), float("nan")
    p, z2 = correct / count, z * z
    centre = (p + z2 / (2 * count)) / (1 + z2 / count)
    half = z * math.sqrt(p * (1 - p) / count + z2 / (4 * count * count)) / (1 + z2 / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per confidence bin (equal width on [0, 1]): images, mean confidence, accuracy. The
    count-weighted mean gap over the bins is the ECE torchmetrics reports."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)  # [lo, hi) bins, binned as torchmetrics bins
    which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    conf = torch.bincount(which, weights=confidence, minlength=bins) / count.clamp_min(1)
    acc = torch.bincount(which, weights=correct, minlength=bins) / count.clamp_min(1)
    return [
        {"lo": i / bins, "hi": (i + 1) / bins, "count": int(n), "confidence": float(cf), "accuracy": float(a)}
        for i, (n, cf, a) in enumerate(zip(count, conf, acc))
    ]


def write_figures(metrics: dict[str, Any], out: str | os.PathLike, title: str = "") -> dict[str, str]:
    """``confusion.png`` (a heat map with the class names) and ``reliability.png`` (accuracy
    against confidence per bin, the gap shaded) in ``out``; each written under a temporary
    name and renamed, so a failed draw leaves no half-written figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, cm = metrics["classes"], np.asarray(metrics["confusion"], dtype=float)
    paths = {}

    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 0.6 + 0.5 * len(names)))
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_title(f"{title}  accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}".strip(), fontsize=9)
    paths["confusion"] = save_figure(fig, out / "confusion.png")

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    bins = [b for b in metrics["reliability"] if b["count"]]
    mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = 1.0 / max(len(metrics["reliability"]), 1)
    ax.bar(mids, [b["accuracy"] for b in bins], width=width, edgecolor="k", lw=0.5, label="accuracy")
    ax.bar(
        mids,
        [b["confidence"] - b["accuracy"] for b in bins],
        bottom=[b["accuracy"] for b in bins],
        width=width,
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}  ECE {metrics['ece']:.3f} ({ECE_BINS} bins), NLL {metrics['nll']:.3f}".strip(), fontsize=9)
    paths["reliability"] = save_figure(fig, out / "reliability.png")
    return paths


def save_figure(fig: Any, path: Path) -> str:
    """``fig`` as a PNG at ``path``, drawn under a temporary name and renamed; the figure is closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return str(path)
