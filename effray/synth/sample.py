"""`effray synth sample`: a trained generator -> a canonical dataset of synthetic images.

Generation is Ray Data batch inference: ``ray.data.range(N).map_batches`` over a pool of
actors that each hold the generator (on a GPU when the cluster has them). Row ``i`` is
class ``i % C`` with the latent drawn from ``(seed, i)``, so the output is the same
whatever the batching, and any prefix of the rows is class-balanced (the pipeline mixes
in the first ``n`` synthetic rows). Each actor writes its shards straight into a
temporary sibling of ``--out`` (so on a multi-node cluster ``--out`` must be shared
storage, as for `effray data prepare`); ``meta.json`` and the per-class grid
``samples.png`` follow, and the directory is renamed into place only when everything
succeeded.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray import __version__
from effray.atomic import replace_dir, temp_sibling, write_file, write_json
from effray.config import require
from effray.data.prepare import SCHEMA
from effray.errors import EffrayError
from effray.synth.config import SynthSampleConfig
from effray.synth.gan import generate
from effray.synth.quality import score_synthetic
from effray.synth.train import build_generator, load_generator
from effray.train.checkpoint import load_checkpoint

GRID_FILE = "samples.png"
QUALITY_FILE = "quality.json"


class GenerateShards:
    """The ``map_batches`` callable: holds the generator, writes one Parquet shard per
    batch of row ids, and returns the shard's counts and pixel sums (for meta.json)."""

    def __init__(self, payload: dict[str, Any], seed: int, out_dir: str) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.g = build_generator(payload).to(self.device).eval()
        self.classes = list(payload["classes"])
        self.seed, self.out_dir = seed, Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = np.asarray(batch["id"], dtype=np.int64)
        c = len(self.classes)
        labels = ids % c
        images = generate(self.g, labels, ids, self.seed, self.device)
        table = pa.table(
            {
                "image": pa.array([im.tobytes() for im in images], pa.binary()),
                "label": pa.array(labels, pa.int64()),
                "index": pa.array(ids, pa.int64()),
                "split": pa.array(["train"] * len(ids), pa.string()),
                "synthetic": pa.array([True] * len(ids), pa.bool_()),
                "name": pa.array([f"synth-{self.classes[y]}-{i // c:06d}" for i, y in zip(ids, labels)], pa.string()),
            },
            schema=SCHEMA,
        )
        # named by the first row id: sorted shard names give the rows in id order
        write_file(
            self.out_dir / "train" / f"part-{int(ids.min()):09d}.parquet",
            lambda tmp: pq.write_table(table, tmp, row_group_size=1024),
        )
        pixels = images.astype(np.float64) / 255.0
        return {
            "rows": np.array([len(ids)]),
            "counts": np.bincount(labels, minlength=c)[None, :],
            "sum": pixels.sum(axis=(0, 1, 2))[None, :],
            "sumsq": (pixels**2).sum(axis=(0, 1, 2))[None, :],
        }


def class_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """uint8 NHWC images (row-major: ``rows`` classes x ``cols`` samples) -> one uint8 image
    with a 1-pixel white border around each tile."""
    n, h, w, ch = images.shape
    grid = np.full((rows * (h + 2), cols * (w + 2), ch), 255, dtype=np.uint8)
    for k in range(min(n, rows * cols)):
        r, q = divmod(k, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = images[k]
    return grid


def save_class_grid(g: Any, payload: dict[str, Any], seed: int, cols: int, path: Path) -> None:
    """``samples.png``: one row per class, the same images as that class's first rows."""
    from PIL import Image

    c = int(payload["num_classes"])
    ids = np.array([j * c + y for y in range(c) for j in range(cols)], dtype=np.int64)
    grid = class_grid(generate(g, ids % c, ids, seed), c, cols)
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    write_file(path, lambda tmp: image.save(tmp, format="PNG"))


def _gpus(cfg: SynthSampleConfig) -> float:
    import ray

    if cfg.gpus_per_actor >= 0:
        return cfg.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def sample(cfg: SynthSampleConfig) -> dict[str, Any]:
    """Generate ``per_class`` images per class in parallel; returns the written meta
    summary (and the quality figures when ``--classifier`` is given)."""
    import ray

    out = Path(cfg.out)
    require(
        not out.exists() or cfg.overwrite,
        f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another --out",
    )
    if cfg.classifier:  # fail before generating anything
        load_checkpoint(cfg.classifier)
    g, payload = load_generator(cfg.generator)
    c = int(payload["num_classes"])
    spec = payload["spec"]
    shape = [int(spec["image_size"]), int(spec["image_size"]), int(spec["channels"])]
    n = c * cfg.per_class
    gpus = _gpus(cfg)
    started = time.time()
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir(parents=True)
    try:
        stats = (
            ray.data.range(n)
            .map_batches(
                GenerateShards,
                fn_constructor_kwargs={"payload": payload, "seed": cfg.seed, "out_dir": str(tmp)},
                batch_size=cfg.batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
                num_cpus=1,
                num_gpus=gpus,
            )
            .take_all()
        )
        counts = np.sum([s["counts"] for s in stats], axis=0)
        pixels = sum(int(s["rows"]) for s in stats) * shape[0] * shape[1]
        mean = np.sum([s["sum"] for s in stats], axis=0) / max(pixels, 1)
        std = np.sqrt(np.maximum(np.sum([s["sumsq"] for s in stats], axis=0) / max(pixels, 1) - mean**2, 1e-12))
        if int(counts.sum()) != n:
            raise EffrayError(f"generated {int(counts.sum())} rows, expected {n}; re-run effray synth sample")
        with open(cfg.generator, "rb") as fh:
            checksum = hashlib.sha256(fh.read()).hexdigest()[:16]
        meta = {
            "format_version": 1,
            "effray_version": __version__,
            "source": f"synth:{Path(cfg.generator).resolve()}",
            "source_kind": "synthetic",
            "source_checksum": checksum,
            "classes": list(payload["classes"]),
            "num_classes": c,
            "image_shape": shape,
            "splits": ["train"],
            "counts": {"train": n},
            "counts_per_class": {"train": counts.astype(int).tolist()},
            "mean": mean.tolist(),
            "std": std.tolist(),
            "val_fraction": 0.0,
            "seed": cfg.seed,
            "limit": 0,
            "skipped_bad": 0,
            "bad_examples": [],
            "prepare_seconds": round(time.time() - started, 2),
            "synthetic": {
                "generator": str(Path(cfg.generator).resolve()),
                "per_class": cfg.per_class,
                "generator_data_checksum": payload["data"].get("checksum", ""),
                "generator_epochs": len(payload.get("history", [])),
                "gpus_per_actor": gpus,
            },
        }
        write_json(tmp / "meta.json", meta)
        cols = min(cfg.grid_columns, cfg.per_class)
        save_class_grid(g, payload, cfg.seed, cols, tmp / GRID_FILE)
        quality = None
        if cfg.classifier:
            real = cfg.real or payload["config"].get("data", "")
            require(bool(real), "--classifier needs --real DIR (the generator doesn't record its data)")
            quality = score_synthetic(str(tmp), cfg.classifier, real, "val", 5000)
            write_json(tmp / QUALITY_FILE, quality)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out.resolve()),
        "rows": n,
        "classes": c,
        "per_class": cfg.per_class,
        "grid": str(out.resolve() / GRID_FILE),
        "seconds": round(time.time() - started, 2),
        **({"quality": quality} if quality else {}),
    }
