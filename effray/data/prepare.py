"""``effray data prepare``: any source -> effray's canonical dataset, atomically.

Canonical layout (``DIR``)::

    meta.json               classes, counts per split, mean/std, image shape, checksum
    train/part-00000.parquet  image (raw HWC uint8 bytes), label, index, split, synthetic, name
    val/part-00000.parquet
    test/...                the source's own test split (CIFAR's test_batch), else one carved
                            out of it (--test-fraction): never trained on, never selected on

Decoding runs as one Ray task per chunk; each task writes its shards straight into a
temporary sibling directory, which is renamed into place only when every task
succeeded, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effray import __version__
from effray.atomic import replace_dir, write_json
from effray.config import option, require
from effray.console import say
from effray.data.augment_size import resize_and_crop
from effray.data.sources import Chunk, SourcePlan, load_chunk, plan_source
from effray.data.splits import assign_splits
from effray.errors import EffrayError
from effray.storage import check_storage_for_cluster

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DECODE_ROWS = 256  # rows a prepare task decodes at a time (then resizes, with --image-size)
SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("index", pa.int64()),
        ("split", pa.string()),
        ("synthetic", pa.bool_()),
        ("name", pa.string()),
    ]
)


@dataclass(frozen=True)
class PrepareConfig:
    """How to turn a source into the canonical dataset."""

    source: str = option("", "source: cifar10:DIR, cifar100:DIR, folder:DIR, parquet:PATH, synthetic:N or a path")
    out: str = option("", "output directory (created atomically)")
    val_fraction: float = option(0.1, "fraction of each class held out as the validation split")
    test_fraction: float = option(
        0.1,
        "fraction of each class held out as the test split when the source has none: never trained on nor used to "
        "choose a model, it gives the final, honest estimate (0 = no test split; a source's own test split is kept)",
    )
    seed: int = option(0, "seed for the split (and synthetic images)")
    limit: int = option(0, "use only the first N rows of the source (0 = all)")
    classes: str = option("", "class names: cifar10, a count, or a,b,c (default: from the source)")
    download: bool = option(False, "download cifar10:/cifar100: sources with torchvision first")
    skip_bad: bool = option(False, "drop and count bad rows instead of failing")
    image_size: int = option(
        0,
        "resize every image's short side to S and centre-crop it to S x S, once, before anything is stored: "
        "sources of any size, mixed sizes too (0 = keep the source's size, which must then be one size)",
    )
    overwrite: bool = option(False, "replace an existing output directory")

    def validate(self) -> None:
        require(
            bool(self.source),
            "--source is required (e.g. parquet:../shared/data/cifar10-train.parquet or synthetic:500)",
        )
        require(bool(self.out), "--out DIR is required")
        require(0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        require(0.0 <= self.test_fraction < 1.0, f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        require(
            self.val_fraction + self.test_fraction < 1.0,
            f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction} leave no training rows; "
            "make their sum < 1",
        )
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(0 <= self.image_size <= 4096, f"--image-size must be in 0..4096 (0 = as stored), got {self.image_size}")


def class_in_name(name: str, class_index: dict[str, int]) -> int | None:
    """The class a row's path names (``train/<class>/0001.jpg``), if its folder is a class."""
    parts = str(name).replace("\\", "/").split("/")
    return class_index.get(parts[-2]) if len(parts) >= 2 else None


def _decode_and_write(
    chunk: Chunk,
    splits: list[str],
    channels: int | None,
    shape: tuple | None,
    classes: list[str],
    labels_checked: bool,
    skip_bad: bool,
    tmp: str,
    part: int,
    image_size: int = 0,
) -> dict[str, Any]:
    """Ray task body: decode a chunk, check every row, write one shard per split. With
    ``image_size`` each image is resized and centre-cropped as soon as it is decoded (a
    few hundred rows at a time), so a chunk of large photos never sits decoded in memory."""
    images: list[np.ndarray | None] = []
    errors, names, label_parts = [], [], []
    for piece in split_chunk(chunk, DECODE_ROWS):
        decoded, piece_labels = load_chunk(piece, channels)
        images += [
            img if err or not image_size else resize_and_crop(img, image_size)
            for img, err in zip(decoded.images, decoded.errors)
        ]
        errors += decoded.errors
        names += decoded.names
        label_parts.append(piece_labels)
    labels = np.concatenate(label_parts)
    num_classes, class_index = len(classes), {c: i for i, c in enumerate(classes)}
    for i, img in enumerate(images):
        if errors[i]:
            continue
        named = class_in_name(names[i], class_index)
        if shape is not None and img.shape != shape:
            errors[i] = (
                f"image shape {img.shape} differs from the dataset's {shape} (mixed image sizes: --image-size S "
                "resizes every image to S x S)"
            )
        elif labels[i] < 0 or (labels_checked and labels[i] >= num_classes):
            errors[i] = f"label {labels[i]} outside the class range 0..{num_classes - 1}"
        elif named is not None and named != labels[i]:
            errors[i] = (
                f"label {labels[i]} ({classes[labels[i]]}) disagrees with the class "
                f"{classes[named]!r} its name is filed under"
            )
    bad = [(chunk.start + i, names[i], e) for i, e in enumerate(errors) if e]
    if bad and not skip_bad:
        return {"bad": bad[:1], "n_bad": len(bad)}
    import ray

    stats: dict[str, Any] = {
        "bad": bad[:5],
        "n_bad": len(bad),
        "counts": {},
        "sum": None,
        "sumsq": None,
        "pixels": 0,
        "node": ray.get_runtime_context().get_node_id(),
    }
    for split in SPLITS:
        rows = [i for i in range(chunk.count) if not errors[i] and splits[i] == split]
        if not rows:
            continue
        table = pa.table(
            {
                "image": pa.array([images[i].tobytes() for i in rows], pa.binary()),
                "label": pa.array(labels[rows], pa.int64()),
                "index": pa.array([chunk.start + i for i in rows], pa.int64()),
                "split": pa.array([split] * len(rows), pa.string()),
                "synthetic": pa.array([chunk.kind == "synthetic"] * len(rows), pa.bool_()),
                "name": pa.array([str(names[i]) for i in rows], pa.string()),
            },
            schema=SCHEMA,
        )
        os.makedirs(os.path.join(tmp, split), exist_ok=True)
        pq.write_table(table, os.path.join(tmp, split, f"part-{part:05d}.parquet"), row_group_size=1024)
        stats["counts"][split] = np.bincount(labels[rows], minlength=num_classes).tolist()
        if split == "train":  # exact integer sums, one image at a time (a float64 stack of 224 px images is GBs)
            total, totalsq = 0, 0
            for i in rows:
                px = images[i].reshape(-1, images[i].shape[2]).astype(np.int64)
                total, totalsq = total + px.sum(0), totalsq + (px * px).sum(0)
            stats["sum"] = (np.asarray(total, np.float64) / 255.0).tolist()
            stats["sumsq"] = (np.asarray(totalsq, np.float64) / 255.0**2).tolist()
            stats["pixels"] = int(sum(images[i].shape[0] * images[i].shape[1] for i in rows))
    return stats


def split_chunk(chunk: Chunk, rows: int) -> list[Chunk]:
    """A source's chunk as pieces of at most ``rows`` rows (folder and Parquet chunks; a
    CIFAR pickle is read whole anyway): decoding one piece at a time bounds a task's memory,
    and ``effray predict`` spreads the pieces over the cluster."""
    if chunk.kind not in ("folder", "parquet") or chunk.count <= rows:
        return [chunk]
    pieces = []
    for off in range(0, chunk.count, rows):
        n = min(rows, chunk.count - off)
        extra = dict(chunk.extra)
        if chunk.kind == "folder":
            extra["files"], extra["labels"] = extra["files"][off : off + n], extra["labels"][off : off + n]
        else:
            extra["offset"] = extra["offset"] + off
        pieces.append(Chunk(chunk.kind, chunk.start + off, n, chunk.path, chunk.fixed_split, extra))
    return pieces


SMALL_CLASS = 0.1  # a class under this fraction of the median class is worth a warning


def check_labels(plan: SourcePlan) -> list[str]:
    """Label sanity before anything is decoded. When the classes were inferred from the
    labels (``0..max``), labels that leave classes empty mean a few stray values (one label
    993 among 0..9 would make 984 empty classes): an error naming those rows. Empty classes
    of a named class list, and classes far smaller than the median, are warnings (returned,
    and said on the terminal): a subset can lack a class on purpose."""

    classes, labels = plan.classes, plan.labels
    counts = np.bincount(labels[(labels >= 0) & (labels < len(classes))], minlength=len(classes))
    empty = np.flatnonzero(counts == 0)
    if len(empty) and not plan.labels_checked:
        first = int(empty[0])
        rows = np.flatnonzero(labels > first)
        shown = ", ".join(f"row {r} (label {labels[r]})" for r in rows[:5]) + (
            f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        )
        raise EffrayError(
            f"labels leave {len(empty)} of the {len(classes)} classes 0..{len(classes) - 1} empty, "
            f"from class {first} on; labels above {first - 1}: {shown}; fix those rows, or pass "
            f"--classes N (or names) and --skip-bad to drop rows outside it"
        )
    warnings = [f"class {classes[i]!r} has no rows in {plan.spec}" for i in empty[:10]]
    if len(empty) > 10:
        warnings.append(f"... and {len(empty) - 10} more empty classes")
    present = counts[counts > 0]
    median = float(np.median(present)) if len(present) else 0.0
    if median >= 20:
        small = [i for i in np.flatnonzero((counts > 0) & (counts < SMALL_CLASS * median))]
        warnings += [f"class {classes[i]!r} has {counts[i]} rows, the median class {median:.0f}" for i in small[:10]]
    for w in warnings:
        say(f"effray: warning: {w}")
    return warnings


def _probe_shape(plan: SourcePlan) -> tuple[tuple[int, ...], int]:
    """Decode the first good image to fix the dataset's shape and channel count."""
    decoded, _ = load_chunk(_first_rows(plan.chunks[0], 16), None)
    for img, err in zip(decoded.images, decoded.errors):
        if not err:
            return tuple(img.shape), img.shape[2]
    raise EffrayError(f"the first 16 rows of {plan.spec} are all unreadable ({decoded.errors[0]}); check the source")


def _first_rows(chunk: Chunk, n: int) -> Chunk:
    extra = dict(chunk.extra)
    if "files" in extra:
        extra["files"], extra["labels"] = extra["files"][:n], extra["labels"][:n]
    return Chunk(chunk.kind, chunk.start, min(n, chunk.count), chunk.path, chunk.fixed_split, extra)


def _limit_plan(plan: SourcePlan, limit: int) -> SourcePlan:
    if not limit or limit >= len(plan.labels):
        return plan
    chunks = [
        c if c.start + c.count <= limit else _first_rows(c, limit - c.start) for c in plan.chunks if c.start < limit
    ]
    plan.chunks, plan.labels = chunks, plan.labels[:limit]
    return plan


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the conversion on the current Ray cluster; returns the written meta.json."""
    import ray

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EffrayError(f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another --out")
    started = time.time()
    plan = _limit_plan(plan_source(cfg.source, cfg.classes or None, cfg.download, cfg.seed), cfg.limit)
    warnings = check_labels(plan)
    shape, channels = _probe_shape(plan)
    if cfg.image_size:
        shape = (cfg.image_size, cfg.image_size, channels)
    fixed = np.concatenate([np.full(c.count, c.fixed_split, dtype=object) for c in plan.chunks])
    has_test = bool((fixed == "test").any())
    splits = assign_splits(plan.labels, fixed, cfg.val_fraction, cfg.seed, 0.0 if has_test else cfg.test_fraction)
    if has_test and cfg.test_fraction:
        say(f"[effray prepare] test split: the source's own, kept ({int((fixed == 'test').sum())} rows); none carved")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    check_storage_for_cluster(str(out.parent))  # every node's tasks write their shards there
    tmp.mkdir(parents=True)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_decode_and_write)
        refs = [
            task.remote(
                c,
                splits[c.start : c.start + c.count].tolist(),
                channels,
                shape,
                plan.classes,
                plan.labels_checked,
                cfg.skip_bad,
                str(tmp),
                i,
                cfg.image_size,
            )
            for i, c in enumerate(plan.chunks)
        ]
        results = ray.get(refs)
        first_bad = next((r["bad"][0] for r in results if r["bad"] and not cfg.skip_bad), None)
        if first_bad is not None:
            row, name, reason = first_bad
            raise EffrayError(f"bad row {row} ({name}) in {plan.spec}: {reason}; fix or remove it, or pass --skip-bad")
        meta = {**_meta(cfg, plan, shape, results, time.time() - started, has_test), "warnings": warnings}
        if sum(meta["counts"].values()) == 0:
            raise EffrayError(f"no usable rows in {plan.spec} (all {meta['skipped_bad']} were bad); check the source")
        write_json(tmp / "meta.json", meta)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # where the decoding ran (not in meta.json: node ids change from run to run)
    return {**meta, "decoded_on": sorted({r["node"] for r in results if "node" in r})}


def _meta(
    cfg: PrepareConfig, plan: SourcePlan, shape: tuple, results: list[dict], seconds: float, source_test: bool
) -> dict[str, Any]:
    n_cls = len(plan.classes)
    per_class = {s: np.zeros(n_cls, dtype=np.int64) for s in SPLITS}
    total, totalsq, pixels = np.zeros(shape[2]), np.zeros(shape[2]), 0
    for r in results:
        for s, c in r["counts"].items():
            per_class[s] += np.asarray(c)
        if r["sum"] is not None:
            total += r["sum"]
            totalsq += r["sumsq"]
            pixels += r["pixels"]
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(totalsq / max(pixels, 1) - mean**2, 1e-12))
    present = [s for s in SPLITS if per_class[s].sum() > 0]
    return {
        "format_version": FORMAT_VERSION,
        "effray_version": __version__,
        "source": plan.spec,
        "source_kind": plan.kind,
        "source_checksum": plan.checksum,
        "classes": plan.classes,
        "num_classes": n_cls,
        "image_shape": list(shape),
        "image_size": cfg.image_size,  # --image-size: every image resized and centre-cropped to it (0: as stored)
        "splits": present,
        "counts": {s: int(per_class[s].sum()) for s in present},
        "counts_per_class": {s: per_class[s].tolist() for s in present},
        "mean": mean.tolist(),
        "std": std.tolist(),
        "val_fraction": cfg.val_fraction,
        # where the test split came from: the source's own, carved out here (--test-fraction), or none
        "test_split": "source" if source_test else ("carved" if "test" in present else "none"),
        "test_fraction": 0.0 if source_test else cfg.test_fraction,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "skipped_bad": int(sum(r["n_bad"] for r in results)),
        "bad_examples": [f"row {b[0]} ({b[1]}): {b[2]}" for r in results for b in r["bad"]][:10],
        "prepare_seconds": round(seconds, 2),
    }


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a prepared dataset's meta.json; a directory that is not one is a clear error."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise EffrayError(
            f"{str(data_dir)!r} is not a prepared dataset (no meta.json); run `effray data prepare --out {data_dir}` "
            "first"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise EffrayError(
            f"{data_dir} has dataset format {meta.get('format_version')}, this effray reads {FORMAT_VERSION}; re-run "
            "effray data prepare"
        )
    return meta


def split_files(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The Parquet shards of one split (sorted, so reads are reproducible)."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise EffrayError(
            f"dataset {data_dir} has no {split!r} split (has {', '.join(meta['splits'])}); re-prepare with "
            "--val-fraction > 0"
        )
    return sorted(str(p) for p in (Path(data_dir) / split).glob("*.parquet"))
