"""Exact and near duplicates, and leaks between splits, from hashes and neighbour lists.

Everything here is a pure function of arrays: hashing is the ``map_batches`` UDF Ray Data
runs over every split; the grouping runs on the driver over one row per image (a hash
and a few neighbours), so it is linear in the data.

Rules, the same for exact and near copies:

- within a split, the row with the smallest ``index`` of a group stays; the later ones are
  ``duplicate`` (exact) or ``near_duplicate`` of it;
- a train row with a copy in val, test or the ``--reference`` dataset is a ``leak``
  (``match`` says exact or near); leaks are only ever train rows: the evaluation side
  is never touched, and the reference is only read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from effray.data.images import decode_batch

EVAL_ORDER = ("val", "test", "reference")  # which copy a leak names when it has several


def image_hashes(images: np.ndarray) -> np.ndarray:
    """blake2b-128 hex digest of each decoded uint8 image's bytes, keyed by its shape (two
    images of different shapes but the same bytes are not copies)."""
    return np.array(
        [
            hashlib.blake2b(
                np.ascontiguousarray(im).tobytes(), digest_size=16, person=str(im.shape).encode()[:16]
            ).hexdigest()
            for im in images
        ],
        dtype=object,
    )


def hash_rows(batch: Any, *, shape: tuple[int, ...], origin: str) -> dict[str, np.ndarray]:
    """The hashing ``map_batches`` UDF: Arrow rows -> ``origin, index, label, hash``."""
    decoded = decode_batch(batch, shape)
    n = len(decoded["label"])
    return {
        "origin": np.array([origin] * n, dtype=object),
        "index": decoded["index"].astype(np.int64),
        "label": decoded["label"],
        "hash": image_hashes(decoded["image"]),
    }


def finding(row: dict[str, Any], reason: str, match: str, of: dict[str, Any] | None, score: float) -> dict[str, Any]:
    """One removed.parquet row (label columns are filled in by the label step, if any)."""
    return {
        "split": row["origin"],
        "index": int(row["index"]),
        "label": int(row["label"]),
        "reason": reason,
        "match": match,
        "duplicate_of_split": of["origin"] if of else None,
        "duplicate_of_index": int(of["index"]) if of else None,
        "score": float(score),
    }


def _first_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    evals = [r for r in rows if r["origin"] in EVAL_ORDER]
    return min(evals, key=lambda r: (EVAL_ORDER.index(r["origin"]), r["index"])) if evals else None


def exact_findings(
    origin: np.ndarray, index: np.ndarray, label: np.ndarray, hashes: np.ndarray
) -> list[dict[str, Any]]:
    """Duplicates within each split and train leaks, from one hash per row."""
    order = np.lexsort((index, hashes.astype(str)))
    h = hashes[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], len(h)]
    out: list[dict[str, Any]] = []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        rows = [{"origin": origin[i], "index": int(index[i]), "label": int(label[i])} for i in order[s:e]]
        leak_of = _first_eval(rows)
        for split in sorted({r["origin"] for r in rows} - {"reference"}):
            members = sorted((r for r in rows if r["origin"] == split), key=lambda r: r["index"])
            if split == "train" and leak_of is not None:
                out += [finding(r, "leak", "exact", leak_of, 1.0) for r in members]
            else:
                out += [finding(r, "duplicate", "exact", members[0], 1.0) for r in members[1:]]
    return out


def near_findings(
    origin: np.ndarray,
    index: np.ndarray,
    label: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    queries: np.ndarray,
    threshold: float,
    already: set[tuple[str, int]],
) -> list[dict[str, Any]]:
    """Near duplicates and near leaks from kNN results. Rows are numbered by position in
    ``origin``/``index``/``label`` (sorted by (origin, index) within each origin, so position
    order is index order); ``neighbours[q]``/``scores[q]`` are query row ``queries[q]``'s
    nearest rows and their similarities. Each later row of a pair above ``threshold`` is a
    near duplicate of its most similar earlier row (pairs, not connected components: one
    image that resembles many does not chain them together). Rows in ``already`` (flagged as exact copies) and
    their pairs are left to the exact step."""
    row = lambda i: {"origin": origin[i], "index": int(index[i]), "label": int(label[i])}  # noqa: E731
    flagged = lambda i: (str(origin[i]), int(index[i])) in already  # noqa: E731
    leaks: dict[int, tuple[float, int]] = {}
    copies: dict[int, tuple[float, int]] = {}
    for q, nbrs, sims in zip(queries, neighbours, scores):
        for j, s in zip(nbrs, sims):
            if j < 0 or s < threshold or j == q or flagged(q) or flagged(j):
                continue
            a, b = (int(q), int(j)) if origin[q] == "train" else (int(j), int(q))
            if origin[a] == "train" and origin[b] in EVAL_ORDER:
                pick = leaks
            elif origin[a] == origin[b] and origin[a] != "reference":
                a, b = max(a, b), min(a, b)  # the later row is the copy
                pick = copies
            else:
                continue
            if a not in pick or s > pick[a][0]:
                pick[a] = (float(s), b)
    out = [finding(row(a), "leak", "near", row(b), s) for a, (s, b) in sorted(leaks.items())]
    return out + [
        finding(row(a), "near_duplicate", "near", row(b), s) for a, (s, b) in sorted(copies.items()) if a not in leaks
    ]
