"""Near duplicates: the kNN over the embedding, each pair's relative score, a threshold
calibrated on synthetic copies, the findings and the ranked candidate pairs.

A seeded sample of train images gets synthetic copies
(:func:`effray.clean.calibrate.synthetic_copies`), embedded in the same pass as every row
and searched against every row like one. A copy's score against its source is a
positive; every dataset row's score against its nearest other real image of the dataset
(not an exact copy; not the reference's, which may hold its copies) a negative. The
threshold is the one :func:`effray.clean.calibrate.choose_threshold` picks from them (or
``--near-threshold``), and the report says what it means in those terms: which share of
each kind of copy it finds, which share of real images it flags, and the precision that
implies for the leaks it found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.clean import pixels
from effray.clean.calibrate import DEFINITION, RESHOT, choose_threshold, synthetic_copies
from effray.clean.config import CleanConfig
from effray.clean.duplicates import EVAL_ORDER, near_findings
from effray.clean.embed import PIXEL_GRID, ZOOMS, finish
from effray.clean.knn import BASELINE, relative_knn, relative_score


@dataclass(frozen=True)
class Calibration:
    """The sampled train rows (positions in the passes' row order) and their copies."""

    sample: np.ndarray
    copies: np.ndarray  # uint8 NHWC
    source: np.ndarray  # the position in ``sample`` each copy was made from
    kinds: np.ndarray  # a calibrate.KINDS name per copy


def calibration_copies(cfg: CleanConfig, rows: dict[str, np.ndarray], train: dict[str, np.ndarray]) -> Calibration:
    """``--calibration`` train rows drawn with ``--seed`` (none without ``--near``) and their
    synthetic copies, less any copy that came out pixel-identical (a JPEG copy can)."""
    train_pos = {int(i): p for p, i in enumerate(train["index"])}
    n_train = int(np.sum(rows["origin"] == "train"))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xCA1B]))
    sample = (
        np.sort(rng.choice(n_train, min(cfg.calibration, n_train), replace=False))
        if cfg.near
        else np.zeros(0, np.int64)
    )
    images = train["image"][[train_pos[int(i)] for i in rows["index"][sample]]] if len(sample) else train["image"][:0]
    copies, source, kinds = synthetic_copies(images, seed=cfg.seed)
    changed = np.any(copies.reshape(len(copies), -1) != images[source].reshape(len(copies), -1), axis=1)
    return Calibration(sample, copies[changed], source[changed], kinds[changed])


def search(
    cfg: CleanConfig, emb: dict[str, np.ndarray], copy_emb: dict[str, np.ndarray], channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row and every copy against every row: ``(similarities, key positions,
    relative scores)``, ``(rows + copies, --neighbours)`` each."""
    n_rows = len(emb["origin"])
    query_ids = np.r_[np.arange(n_rows), -1 - np.arange(len(copy_emb["thumb"]))]  # a copy is no row
    key_ids = np.arange(n_rows)
    if cfg.embedder == "pixels":
        coarse = np.concatenate([emb["coarse"], copy_emb["coarse"]])
        thumbs = np.concatenate([emb["thumb"], copy_emb["thumb"]])
        sims, where, base = relative_knn(
            coarse,
            emb["coarse"][:, :1],
            cfg.neighbours,
            query_ids=query_ids,
            key_ids=key_ids,
            shortlist=cfg.shortlist,
            block=cfg.block_rows,
            query_thumbs=thumbs,
            key_fine=emb["fine"],
        )
    else:
        fdim = int(emb["views"].shape[2] - channels * PIXEL_GRID * PIXEL_GRID)  # the model part; the rest is pixels
        dataset_rows = np.flatnonzero(emb["origin"] != "reference")
        both = finish(np.concatenate([emb["views"], copy_emb["views"]]), fdim, rows=dataset_rows)
        sims, where, base = relative_knn(
            both,
            both[:n_rows],
            cfg.neighbours,
            query_ids=query_ids,
            key_ids=key_ids,
            shortlist=cfg.shortlist,
            block=cfg.block_rows,
        )
    return sims, where, relative_score(sims, base)


def near_duplicates(
    cfg: CleanConfig,
    rows: dict[str, np.ndarray],
    emb: dict[str, np.ndarray],
    copy_emb: dict[str, np.ndarray],
    calib: Calibration,
    already: set[tuple[str, int]],
    channels: int,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, np.ndarray]]:
    """The search, the calibrated threshold, the near findings (a row ``already`` flagged
    as an exact copy is not flagged again) and the ranked candidate pairs."""
    n = len(rows["origin"])
    sims, where, scores = search(cfg, emb, copy_emb, channels)
    # positives: each copy against its own source; negatives: each dataset row against its nearest other image
    source_rows = calib.sample[calib.source]
    is_source = where[n:] == source_rows[:, None]
    positives = np.where(is_source, scores[n:], 0.0).max(1) if len(source_rows) else np.zeros(0)
    hashes, origin = rows["hash"], rows["origin"]
    nbr = np.maximum(where[:n], 0)
    # a dataset row against the dataset: the reference may be full of its copies (that is what is looked for)
    other = (where[:n] >= 0) & (hashes[nbr] != hashes[:, None]) & (origin[nbr] != "reference")
    dataset = origin != "reference"
    negatives = np.where(other, scores[:n], 0.0).max(1)[dataset]
    calibrated = choose_threshold(
        positives, negatives, cfg.max_fpr, trim_at=float(np.median(positives[np.isin(calib.kinds, RESHOT)]))
    )
    threshold = cfg.near_threshold or calibrated["threshold"]
    kinds = calib.kinds
    recall = {k: round(float((positives[kinds == k] >= threshold).mean()), 4) for k in dict.fromkeys(kinds)}
    tpr = float((positives >= threshold).mean())
    clean_neg = negatives[negatives < calibrated["trim_at"]]
    fpr = float((clean_neg >= threshold).mean()) if len(clean_neg) else 0.0
    found = near_findings(origin, rows["index"], rows["label"], where[:n], scores[:n], np.arange(n), threshold, already)
    candidates = ranked_pairs(origin, hashes, where[:n], sims[:n], scores[:n], threshold, cfg.candidates)
    info = {
        "threshold": float(threshold),
        "score": (
            f"relative: (1 - b) / (1 - similarity), b = the query's mean similarity to its neighbours ranked "
            f"{BASELINE[0] + 1}-{BASELINE[1]}"
        ),
        "source": "--near-threshold"
        if cfg.near_threshold
        else f"calibrated: largest TPR - FPR at FPR <= {cfg.max_fpr:g}",
        "calibrated_threshold": calibrated["threshold"],
        "definition": DEFINITION,
        "calibration_images": int(len(calib.sample)),
        "copies": int(len(positives)),
        "recall": tpr,
        "recall_per_kind": recall,
        "real_images_above": fpr,
        "with_own_copy": calibrated["trimmed"],
        **expected_precision(origin, where[:n], scores[:n], threshold, fpr),
        "meaning": (
            f"At this score {tpr:.1%} of {len(positives)} synthetic copies of {len(calib.sample)} train images are "
            f"found, and {fpr:.1%} of the dataset's real images have a different real image above it (leaving out "
            f"{calibrated['trimmed']} whose nearest image scores like a typical re-shot copy: they have copies of "
            "their own; the rest still hold some, so this rate is an upper bound)."
        ),
        "embedding": embedding_name(cfg),
        "embedder": cfg.embedder,
        "neighbours": cfg.neighbours,
        "shortlist": cfg.shortlist,
        "block_rows": cfg.block_rows,
    }
    return found, info, candidates


def embedding_name(cfg: CleanConfig) -> str:
    """The report's one-line description of what the kNN compares."""
    if cfg.embedder == "pixels":
        return (
            f"pixels: a {pixels.COARSE}x{pixels.COARSE} shortlist of {cfg.shortlist} per image, re-scored at "
            f"{pixels.FINE}x{pixels.FINE} by the best of {pixels.VIEWS} views (zoom {pixels.ZOOMS[0]}.."
            f"{pixels.ZOOMS[-1]} px, shifts {pixels.SHIFTS[0]}..{pixels.SHIFTS[-1]} px, mirrored) of the "
            f"{pixels.THUMB} px thumbnail"
        )
    return (
        f"classifier penultimate features (flip-symmetric, centred) + {PIXEL_GRID}x{PIXEL_GRID} pixels, "
        f"best of {len(ZOOMS)} zoom views ({', '.join(map(str, ZOOMS))} px cut per side)"
    )


def expected_precision(
    origin: np.ndarray, where: np.ndarray, scores: np.ndarray, threshold: float, fpr: float
) -> dict[str, Any]:
    """What the leak flags are worth: of the ``n`` evaluation and reference images, ``f``
    have a train image above the threshold; at most ``fpr * n`` of those are expected by
    chance (a real image with no copy scores like the dataset's own rows), so the leaks'
    precision is at least ``1 - fpr * n / f``. (Not given for copies within a split: the
    rate is measured on those same rows.)"""
    evals = np.isin(origin, EVAL_ORDER)
    q, col = np.nonzero((scores >= threshold) & (where >= 0))
    j = where[q, col]
    seen = np.r_[q[evals[q] & (origin[j] == "train")], j[(origin[q] == "train") & evals[j]]]
    flagged = len(np.unique(seen))
    n = int(evals.sum())
    est = None if not flagged else round(max(0.0, 1.0 - fpr * n / flagged), 3)
    return {"eval_images": n, "eval_images_flagged": flagged, "leak_precision_at_least": est}


def ranked_pairs(
    origin: np.ndarray,
    hashes: np.ndarray,
    where: np.ndarray,
    sims: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    top: int,
) -> dict[str, np.ndarray]:
    """The ``top`` highest-scoring pairs of rows that could be a leak (train with val, test
    or the reference) or a near duplicate (two rows of one split), each pair once (its
    better direction), best first: row positions ``a`` (the train / later row) and ``b``,
    ``kind``, ``similarity``, ``score`` and ``flagged`` (at or above the threshold).
    Pixel-identical pairs (equal ``hashes``) are left out: the exact pass reports them,
    and at the top of the list they would hide the near copies a person is there to review."""
    q = np.repeat(np.arange(len(where)), where.shape[1])
    j, s, r = where.ravel(), sims.ravel(), scores.ravel()
    ok = j >= 0
    q, j, s, r = q[ok], j[ok], s[ok], r[ok]
    oq, oj = origin[q], origin[j]
    leak = ((oq == "train") & np.isin(oj, EVAL_ORDER)) | ((oj == "train") & np.isin(oq, EVAL_ORDER))
    dup = (oq == oj) & (oq != "reference")
    keep = (leak | dup) & (hashes[q] != hashes[j])
    q, j, s, r, leak = q[keep], j[keep], s[keep], r[keep], leak[keep]
    a = np.where(leak, np.where(origin[q] == "train", q, j), np.maximum(q, j))
    b = np.where(leak, np.where(origin[q] == "train", j, q), np.minimum(q, j))
    order = np.lexsort((-r,))  # best first, then the first of each pair
    _, first = np.unique(np.stack([a[order], b[order]], 1), axis=0, return_index=True)
    pick = order[np.sort(first)][:top]
    return {
        "a": a[pick],
        "b": b[pick],
        "kind": np.where(leak[pick], "leak", "near_duplicate").astype(object),
        "similarity": s[pick].astype(np.float64),
        "score": r[pick].astype(np.float64),
        "flagged": r[pick] >= threshold,
    }
