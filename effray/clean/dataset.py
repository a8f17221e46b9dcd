"""Writing canonical datasets: the cleaned copy ``--drop`` makes (:func:`write_cleaned`), or one
built from arrays.

Same layout, schema and ``meta.json`` as :mod:`effray.data.prepare` (counts per split and
class, the train split's mean/std recomputed), written into a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effray import __version__
from effray.atomic import replace_dir, temp_sibling, write_json
from effray.data.images import decode_batch
from effray.data.prepare import FORMAT_VERSION, SCHEMA, SPLITS, split_files

SHARD_ROWS = 10_000


def arrays_table(
    images: np.ndarray,
    labels: np.ndarray,
    index: np.ndarray,
    split: str,
    names: list[str] | None = None,
    synthetic: bool = False,
) -> pa.Table:
    """uint8 NHWC images and their labels/indices as rows of the canonical schema."""
    n = len(labels)
    return pa.table(
        {
            "image": pa.array([np.ascontiguousarray(im).tobytes() for im in images], pa.binary()),
            "label": pa.array(np.asarray(labels, np.int64), pa.int64()),
            "index": pa.array(np.asarray(index, np.int64), pa.int64()),
            "split": pa.array([split] * n, pa.string()),
            "synthetic": pa.array([synthetic] * n, pa.bool_()),
            "name": pa.array(names if names is not None else [f"{split}/{int(i)}" for i in index], pa.string()),
        },
        schema=SCHEMA,
    )


def write_dataset(
    out: str | Path,
    tables: dict[str, pa.Table],
    classes: list[str],
    image_shape: list[int],
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``{split: table}`` as a canonical dataset at ``out`` (atomically); ``base``:
    meta.json fields to keep (source, seed, ...). Returns the written meta."""
    out = Path(out)
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir(parents=True)
    try:
        c = len(classes)
        counts: dict[str, list[int]] = {}
        total, totalsq, pixels = np.zeros(image_shape[2]), np.zeros(image_shape[2]), 0
        for split in SPLITS:
            table = tables.get(split)
            if table is None or table.num_rows == 0:
                continue
            table = table.select(SCHEMA.names).cast(SCHEMA)
            (tmp / split).mkdir()
            for part, start in enumerate(range(0, table.num_rows, SHARD_ROWS)):
                pq.write_table(
                    table.slice(start, SHARD_ROWS), tmp / split / f"part-{part:05d}.parquet", row_group_size=1024
                )
            counts[split] = np.bincount(table.column("label").to_numpy(), minlength=c).tolist()
            if split == "train":
                for start in range(0, table.num_rows, SHARD_ROWS):
                    x = (
                        decode_batch(table.slice(start, SHARD_ROWS), tuple(image_shape))["image"].astype(np.float64)
                        / 255.0
                    )
                    total += x.sum(axis=(0, 1, 2))
                    totalsq += (x**2).sum(axis=(0, 1, 2))
                    pixels += x.shape[0] * x.shape[1] * x.shape[2]
        mean = total / max(pixels, 1)
        std = np.sqrt(np.maximum(totalsq / max(pixels, 1) - mean**2, 1e-12))
        meta = {
            **(base or {}),
            "format_version": FORMAT_VERSION,
            "classes": list(classes),
            "num_classes": c,
            "image_shape": list(image_shape),
            "splits": list(counts),
            "counts": {s: int(sum(v)) for s, v in counts.items()},
            "counts_per_class": counts,
            "mean": mean.tolist(),
            "std": std.tolist(),
        }
        meta.setdefault("effray_version", __version__)
        for key, default in (
            ("source", str(out)),
            ("source_kind", "arrays"),
            ("source_checksum", ""),
            ("val_fraction", 0.0),
            ("seed", 0),
            ("limit", 0),
            ("skipped_bad", 0),
            ("bad_examples", []),
            ("warnings", []),
        ):
            meta.setdefault(key, default)
        write_json(tmp / "meta.json", meta)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def without_rows(data_dir: str | Path, split: str, drop: set[int]) -> pa.Table:
    """A split's rows (every shard, in order) less those whose ``index`` is in ``drop``."""
    import pyarrow.compute as pc

    tables = [pq.read_table(f) for f in split_files(data_dir, split)]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if drop:
        table = table.filter(pc.invert(pc.is_in(table.column("index"), pa.array(sorted(drop), pa.int64()))))
    return table


def write_cleaned(
    out: Path,
    data: str,
    meta: dict[str, Any],
    findings: list[dict[str, Any]],
    reasons: list[str],
    cleaning: dict[str, Any],
) -> dict[str, Any]:
    """``out``: the dataset at ``data`` less every row of a dropped finding, a dataset of its
    own (``source`` ``clean:DATA``, a checksum of the source's and the dropped rows' ids,
    ``cleaning`` plus what was removed in its meta.json). Returns what ``--drop`` did."""
    gone: dict[str, set[int]] = {}
    for f in findings:
        if f["dropped"]:
            gone.setdefault(f["split"], set()).add(f["index"])
    tables = {s: without_rows(data, s, gone.get(s, set())) for s in meta["splits"]}
    ids = ",".join(f"{s}:{i}" for s in sorted(gone) for i in sorted(gone[s]))
    checksum = hashlib.sha256(f"{meta.get('source_checksum', '')}|{ids}".encode()).hexdigest()[:16]
    removed_by_reason = dict(sorted(Counter(f["reason"] for f in findings if f["dropped"]).items()))
    base = {k: v for k, v in meta.items() if k not in ("counts", "counts_per_class", "mean", "std", "splits")}
    base.update(
        source=f"clean:{os.path.abspath(data)}",
        source_checksum=checksum,
        cleaning={
            "source": os.path.abspath(data),
            "source_checksum": meta.get("source_checksum", ""),
            "reasons": reasons,
            "removed": {s: len(v) for s, v in gone.items()},
            "removed_by_reason": removed_by_reason,
            **cleaning,
        },
    )
    new_meta = write_dataset(out, tables, list(meta["classes"]), list(meta["image_shape"]), base)
    return {"reasons": reasons, "rows": sum(len(v) for v in gone.values()), "counts": new_meta["counts"]}
