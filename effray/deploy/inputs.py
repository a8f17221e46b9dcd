"""What ``effray predict`` reads: ``--data`` as a Ray Dataset of rows to predict.

A prepared dataset, anything ``effray data prepare`` takes (CIFAR pickles, class folders,
Parquet) or a plain folder of images, decoded in Ray Data tasks spread over the cluster
into one schema: ``index, name, label, error, image``. A row that can't be used
(unreadable, corrupt, the wrong size) keeps its reason in ``error`` and a blank image of
the model's size, so every batch is one fixed-shape tensor and the skipped row is
reported, never raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.config import require
from effray.console import say
from effray.data.image_bytes import decode_image
from effray.data.images import decode_batch
from effray.data.pipeline import data_context
from effray.data.prepare import load_meta, split_files
from effray.data.sources import IMAGE_SUFFIXES, Chunk, load_chunk, plan_source

FILES_PER_BLOCK = 256  # image files one decode task reads: enough to amortise a task, small enough to spread out
SOURCE_PIECE_ROWS = 1024  # rows of a prepare source one decode task takes (CIFAR pickles: a whole file)
NO_LABEL = -1


# ------------------------------------------------------------------ what --data is


@dataclass(frozen=True)
class Inputs:
    """The rows to predict as a Ray Dataset of ``index, name, label, error, image``."""

    kind: str  # prepared | source | images
    spec: str
    rows: int
    labelled: bool
    dataset: Any


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted: a reproducible ``index``)."""

    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def plan_inputs(data: str, split: str, image_shape: list[int], num_classes: int) -> Inputs:
    """A prepared dataset (meta.json), a plain folder of images (image files at its top
    level), or anything ``effray data prepare`` takes; fails in one line before any task."""
    path = Path(data).absolute()  # actors and tasks may run in another working directory
    if (path / "meta.json").is_file():
        return _prepared(path, split, image_shape, num_classes)
    if path.is_dir() and image_files(path):
        return _image_folder(path, image_shape)
    return _source(absolute_spec(data), image_shape, num_classes)


def absolute_spec(spec: str) -> str:
    """A prepare source spec with its path made absolute (``folder:x`` -> ``folder:/cwd/x``)."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return spec
    if kind in ("cifar10", "cifar100", "folder", "parquet") and rest:
        return f"{kind}:{Path(rest).absolute()}"
    return str(Path(spec).absolute())


def _prepared(path: Path, split: str, image_shape: list[int], num_classes: int) -> Inputs:
    import ray
    from ray.data import DataContext

    meta = load_meta(path)
    files = split_files(path, split)
    shape = [int(v) for v in meta["image_shape"]]
    require(
        shape == list(image_shape),
        f"{path} holds {shape[0]}x{shape[1]}x{shape[2]} images, the model takes "
        f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]}; predict data of the size it was trained on",
    )
    rows = int(meta["counts"].get(split, 0))
    with DataContext.current(data_context(rows * int(np.prod(shape)))):
        ds = ray.data.read_parquet(files, columns=["image", "label", "index", "name"])
    ds = ds.map_batches(decode_prepared, batch_format="pyarrow", num_cpus=1, fn_kwargs={"shape": tuple(shape)})
    return Inputs("prepared", f"{path} ({split})", rows, _same_classes(meta["num_classes"], num_classes, str(path)), ds)


def _image_folder(path: Path, image_shape: list[int]) -> Inputs:
    import ray

    files = image_files(path)
    items = [{"index": i, "path": str(f)} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / FILES_PER_BLOCK))
    ds = ds.map_batches(
        decode_files,
        batch_size=FILES_PER_BLOCK,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={"shape": tuple(image_shape)},
    )
    return Inputs("images", str(path), len(items), False, ds)


def _source(spec: str, image_shape: list[int], num_classes: int) -> Inputs:
    import ray

    plan = plan_source(spec)
    pieces = [p for c in plan.chunks for p in split_chunk(c, SOURCE_PIECE_ROWS)]
    ds = ray.data.from_items([{"piece": i} for i in range(len(pieces))], override_num_blocks=len(pieces))
    ds = ds.map_batches(
        decode_pieces,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={"pieces": pieces, "shape": tuple(image_shape)},
    )
    return Inputs("source", plan.spec, len(plan.labels), _same_classes(len(plan.classes), num_classes, plan.spec), ds)


def _same_classes(data_classes: int, model_classes: int, where: str) -> bool:
    """Whether the data's labels can be scored against the model's classes."""
    if int(data_classes) == int(model_classes):
        return True
    say(
        f"effray: warning: {where} has {data_classes} classes, the model {model_classes}: its labels are kept, "
        "no accuracy is computed"
    )
    return False


def split_chunk(chunk: Any, rows: int) -> list[Any]:
    """A prepare source's chunk as pieces of at most ``rows`` rows, so decoding spreads over
    the cluster (folder and Parquet chunks; a CIFAR pickle is read whole anyway)."""

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


# ------------------------------------------------------------------ decoding (Ray Data UDFs)


def size_error(img: np.ndarray, shape: tuple[int, ...]) -> str:
    """'' when ``img`` has the model's HWC shape, else the reason naming both sizes."""
    if tuple(img.shape) == tuple(shape):
        return ""
    return f"image is {'x'.join(map(str, img.shape))} (HxWxC), the model takes {'x'.join(map(str, shape))}"


def _rows(
    index: list[int],
    names: list[str],
    labels: list[int],
    images: list[np.ndarray | None],
    errors: list[str],
    shape: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Decoded rows as one batch; a bad row keeps its reason and a blank image of the
    model's size, so every image column is one fixed-shape tensor."""
    out = np.zeros((len(images), *shape), np.uint8)
    errors = list(errors)
    for i, img in enumerate(images):
        if errors[i]:
            continue
        errors[i] = size_error(img, shape)
        if not errors[i]:
            out[i] = img
    return {
        "index": np.asarray(index, np.int64),
        "name": np.asarray([str(n) for n in names], dtype=object),
        "label": np.asarray(labels, np.int64),
        "error": np.asarray(errors, dtype=object),
        "image": out,
    }


def decode_prepared(table: Any, *, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A prepared split's Arrow rows (raw pixels, all one size) -> rows to predict."""

    rows = decode_batch(table, shape)
    n = len(rows["label"])
    return {
        "index": rows["index"].astype(np.int64),
        "name": rows["name"].astype(object),
        "label": rows["label"],
        "error": np.full(n, "", dtype=object),
        "image": rows["image"],
    }


def decode_files(batch: dict[str, np.ndarray], *, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Image files -> rows to predict; an unreadable or corrupt file is a row with its reason."""

    images: list[np.ndarray | None] = []
    errors: list[str] = []
    for path in batch["path"]:
        img, err, data = None, "", b""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            err = f"unreadable file ({type(exc).__name__}: {exc.strerror or exc})"
        if not err and not data:
            err = "empty file"
        elif not err:
            try:
                img = decode_image(data, shape[2])
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds (OSError too) for a corrupt file
                err = f"corrupt image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        images.append(img)
        errors.append(err)
    names = [Path(p).name for p in batch["path"]]
    return _rows(batch["index"].tolist(), names, [NO_LABEL] * len(names), images, errors, shape)


def decode_pieces(batch: dict[str, np.ndarray], *, pieces: list[Any], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Pieces of a prepare source (CIFAR pickles, class folders, Parquet) -> rows to predict,
    with the source's labels; bad rows carry the source reader's reason."""

    parts = []
    for i in batch["piece"]:
        chunk = pieces[int(i)]
        decoded, labels = load_chunk(chunk, shape[2])
        index = list(range(chunk.start, chunk.start + chunk.count))
        parts.append(_rows(index, decoded.names, labels.tolist(), decoded.images, decoded.errors, shape))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
