"""Near duplicates: the embeddings' kNN, a threshold calibrated on light copies, findings.

A seeded sample of train images gets light copies (:func:`effray.clean.calibrate.light_copies`),
embedded in the same pass as every row. Each sampled image's similarity to its own copies
is a positive, to its nearest *other* real image a negative; the threshold is the one
:func:`effray.clean.calibrate.choose_threshold` picks from them (or ``--near-threshold``),
and the report says what it means in those terms: which share of copies it finds, and
which share of real images it would flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.clean.calibrate import DEFINITION, choose_threshold, light_copies
from effray.clean.config import CleanConfig
from effray.clean.duplicates import near_findings
from effray.clean.embed import PIXEL_GRID, ZOOMS, finish
from effray.clean.knn import knn, row_similarity


@dataclass(frozen=True)
class Calibration:
    """The sampled train rows (positions in the passes' row order) and their light copies."""

    sample: np.ndarray
    copies: np.ndarray  # uint8 NHWC
    source: np.ndarray  # the position in ``sample`` each copy was made from
    kinds: np.ndarray  # crop | flip | jpeg | all, per copy


def calibration_copies(cfg: CleanConfig, rows: dict[str, np.ndarray], train: dict[str, np.ndarray]) -> Calibration:
    """``--calibration`` train rows drawn with ``--seed`` (none without ``--near``) and their
    light copies, less any copy that came out pixel-identical (a JPEG copy can)."""
    train_pos = {int(i): p for p, i in enumerate(train["index"])}
    n_train = int(np.sum(rows["origin"] == "train"))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xCA1B]))
    sample = (
        np.sort(rng.choice(n_train, min(cfg.calibration, n_train), replace=False))
        if cfg.near
        else np.zeros(0, np.int64)
    )
    images = train["image"][[train_pos[int(i)] for i in rows["index"][sample]]] if len(sample) else train["image"][:0]
    copies, source, kinds = light_copies(images, seed=cfg.seed)
    changed = np.any(copies.reshape(len(copies), -1) != images[source].reshape(len(copies), -1), axis=1)
    return Calibration(sample, copies[changed], source[changed], kinds[changed])


def near_duplicates(
    cfg: CleanConfig,
    rows: dict[str, np.ndarray],
    emb: dict[str, np.ndarray],
    copy_views: np.ndarray,
    calib: Calibration,
    already: set[tuple[str, int]],
    channels: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """kNN over the embeddings, the calibrated threshold and the near findings (a row
    ``already`` flagged as an exact copy is not flagged again)."""
    sample, kinds = calib.sample, calib.kinds
    fdim = int(emb["views"].shape[2] - channels * PIXEL_GRID * PIXEL_GRID)  # the model part; the rest is pixels
    dataset_rows = np.flatnonzero(emb["origin"] != "reference")
    n_all = len(emb["origin"])
    both = finish(np.concatenate([emb["views"], copy_views]), fdim, rows=dataset_rows)
    keys, copy_emb = both[:n_all], both[n_all:]
    nq = len(dataset_rows)  # the dataset's rows come first (ORIGINS order), the reference's last
    scores, neighbours = knn(keys[:nq], keys, cfg.neighbours, cfg.block_rows)
    # calibration: each sampled image against its light copies and its nearest other real image
    positives = row_similarity(keys[sample[calib.source]], copy_emb)
    hashes = rows["hash"]
    negatives = []
    for p in sample:
        other = [s for j, s in zip(neighbours[p], scores[p]) if j >= 0 and hashes[j] != hashes[p]]
        if other:
            negatives.append(other[0])
    calibrated = choose_threshold(positives, np.array(negatives), cfg.max_fpr)
    threshold = cfg.near_threshold or calibrated["threshold"]
    recall = {k: float((positives[kinds == k] >= threshold).mean()) for k in dict.fromkeys(kinds)}
    tpr = float((positives >= threshold).mean())
    clean_neg = np.array(negatives)[np.array(negatives) < np.median(positives)]
    fpr = float((clean_neg >= threshold).mean()) if len(clean_neg) else 0.0
    found = near_findings(
        rows["origin"], rows["index"], rows["label"], neighbours, scores, np.arange(nq), threshold, already
    )
    info = {
        "threshold": float(threshold),
        "source": "--near-threshold"
        if cfg.near_threshold
        else f"calibrated: largest TPR - FPR at FPR <= {cfg.max_fpr:g}",
        "calibrated_threshold": calibrated["threshold"],
        "definition": DEFINITION,
        "calibration_images": int(len(sample)),
        "copies": int(len(positives)),
        "recall": tpr,
        "recall_per_kind": recall,
        "real_images_above": fpr,
        "with_own_copy": calibrated["trimmed"],
        "meaning": (
            f"At this similarity {tpr:.1%} of {len(positives)} light copies of {len(sample)} train images are "
            f"found, and {fpr:.1%} of those real images have a different real image above it "
            f"(leaving out {calibrated['trimmed']} whose nearest image is as close as a typical copy: they have "
            "copies of their own)."
        ),
        "embedding": (
            f"classifier penultimate features (flip-symmetric, centred) + {PIXEL_GRID}x{PIXEL_GRID} pixels, "
            f"best of {len(ZOOMS)} zoom views ({', '.join(map(str, ZOOMS))} px cut per side)"
        ),
        "neighbours": cfg.neighbours,
        "block_rows": cfg.block_rows,
    }
    return found, info
