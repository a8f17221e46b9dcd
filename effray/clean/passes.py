"""The cleaning step's two passes over every row, on Ray Data: one that hashes (exact
copies) and one that embeds (near copies, and, with a classifier, the evaluation splits'
probabilities).

Both read the same sources, ``(directory, split, origin)``, and hand back columns sorted
by (origin in :data:`ORIGINS` order, index), so that a position means the same row in
every pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effray.clean.config import CleanConfig
from effray.clean.dataset import arrays_table
from effray.clean.duplicates import hash_rows
from effray.clean.embed import Embedder
from effray.data.images import decode_batch
from effray.data.pipeline import read_parquet
from effray.data.prepare import split_files

ORIGINS = ("train", "val", "test", "reference")
Sources = list[tuple[str, str, str]]  # (directory, split, origin) of everything read


def sources(data: str, meta: dict[str, Any], ref: tuple[str, dict[str, Any]] | None) -> Sources:
    """What the passes read, in :data:`ORIGINS` order: the dataset's splits, then the
    reference's (all its splits count as one origin)."""
    out = [(data, s, s) for s in ORIGINS if s in meta["splits"]]
    if ref is not None:
        out += [(ref[0], s, "reference") for s in ref[1]["splits"]]
    return out


def _decode_tagged(batch: Any, *, shape: tuple[int, ...], origin: str) -> dict[str, np.ndarray]:
    d = decode_batch(batch, shape)
    return {
        "image": d["image"],
        "label": d["label"],
        "index": d["index"].astype(np.int64),
        "origin": np.array([origin] * len(d["label"]), dtype=object),
    }


def _collect(ds: Any, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


def _ordered(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by (origin in :data:`ORIGINS` order, index): positions mean the same in every pass."""
    rank = np.array([ORIGINS.index(o) if o in ORIGINS else len(ORIGINS) for o in cols["origin"]])
    order = np.lexsort((cols["index"], rank))
    return {k: v[order] for k, v in cols.items()}


def _union(parts: list[Any]) -> Any:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def hash_pass(sources: Sources, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """origin, index, label, hash of every row: one Ray Data ``map_batches`` of pure hashing."""
    parts = [
        read_parquet(split_files(d, s), ["image", "label", "index"]).map_batches(
            hash_rows, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": o}
        )
        for d, s, o in sources
    ]
    return _ordered(_collect(_union(parts), ("origin", "index", "label", "hash")))


def embed_pass(
    sources: Sources,
    copies: np.ndarray,
    payload: dict[str, Any] | None,
    cfg: CleanConfig,
    shape: tuple[int, ...],
    gpus: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The embedding of every row, and of the calibration copies (origin "copy"): pixel
    thumbnails and descriptors always; with ``payload`` (a classifier) its probabilities,
    and with ``--embedder`` a classifier its views."""
    import ray

    parts = [
        read_parquet(split_files(d, s), ["image", "label", "index"]).map_batches(
            _decode_tagged, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": o}
        )
        for d, s, o in sources
    ]
    if len(copies):
        table = arrays_table(copies, np.zeros(len(copies), np.int64), np.arange(len(copies)), "train").select(
            ["image", "label", "index"]
        )
        parts.append(
            ray.data.from_arrow(table).map_batches(
                _decode_tagged, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": "copy"}
            )
        )
    info = payload["data"] if payload is not None else {"mean": [], "std": []}
    features = payload is not None and cfg.uses_classifier
    ds = _union(parts).map_batches(
        Embedder,
        fn_constructor_kwargs={"payload": payload, "mean": info["mean"], "std": info["std"], "features": features},
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=1,
        num_gpus=gpus,
    )
    columns = ("origin", "index", "label", "thumb", "coarse", "fine")
    cols = _collect(ds, columns + (("probs",) if payload is not None else ()) + (("views",) if features else ()))
    is_copy = cols["origin"] == "copy"
    rows = _ordered({k: v[~is_copy] for k, v in cols.items()})
    order = np.argsort(cols["index"][is_copy])
    return rows, {k: v[is_copy][order] for k, v in cols.items()}


def embed_gpus(cfg: CleanConfig) -> float:
    """GPUs per embedding actor and fold trial: ``--gpus-per-actor``, or (-1) one when the
    cluster has any."""
    import ray

    if cfg.gpus_per_actor >= 0:
        return cfg.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
