"""What ``effray predict`` reads: ``--data`` as a Ray Dataset of rows to predict.

A prepared dataset, anything ``effray data prepare`` takes (CIFAR pickles, class folders,
Parquet) or a plain folder of images, decoded in Ray Data tasks spread over the cluster
into one schema: ``index, name, label, error, image``. A row that can't be used
(unreadable, corrupt) keeps its reason in ``error`` and a blank image of the model's size,
so every batch is one fixed-shape tensor and the skipped row is reported, never raised. An
image of another size than the model takes goes through the model's preprocessing (short
side resized, centre cropped: :attr:`~effray.deploy.model.ModelInfo.resize`) and its size
is kept in ``resized_from``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.config import require
from effray.console import say
from effray.data.augment import preprocess, preprocess_image
from effray.data.image_bytes import decode_image
from effray.data.images import decode_batch
from effray.data.pipeline import data_context, read_parquet
from effray.data.prepare import load_meta, split_chunk, split_files
from effray.data.sources import IMAGE_SUFFIXES, load_chunk, plan_source

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


def plan_inputs(data: str, split: str, image_shape: list[int], num_classes: int, resize: str = "") -> Inputs:
    """A prepared dataset (meta.json), a plain folder of images (image files at its top
    level), or anything ``effray data prepare`` takes; fails in one line before any task.
    ``resize``: the model's preprocessing, for images of another size than ``image_shape``."""
    path = Path(data).absolute()  # actors and tasks may run in another working directory
    if (path / "meta.json").is_file():
        return _prepared(path, split, image_shape, num_classes, resize)
    if path.is_dir() and image_files(path):
        return _image_folder(path, image_shape, resize)
    return _source(absolute_spec(data), image_shape, num_classes, resize)


def absolute_spec(spec: str) -> str:
    """A prepare source spec with its path made absolute (``folder:x`` -> ``folder:/cwd/x``)."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return spec
    if kind in ("cifar10", "cifar100", "folder", "parquet") and rest:
        return f"{kind}:{Path(rest).absolute()}"
    return str(Path(spec).absolute())


def _prepared(path: Path, split: str, image_shape: list[int], num_classes: int, resize: str) -> Inputs:
    meta = load_meta(path)
    files = split_files(path, split)
    shape = [int(v) for v in meta["image_shape"]]
    require(
        shape[2] == int(image_shape[2]),
        f"{path} holds {shape[2]}-channel images, the model takes {image_shape[2]}; predict data of its kind",
    )
    rows = int(meta["counts"].get(split, 0))
    ds = read_parquet(files, ["image", "label", "index", "name"], data_context(rows * int(np.prod(shape))))
    kwargs = {"shape": tuple(shape), "model_shape": tuple(image_shape), "resize": resize}
    ds = ds.map_batches(decode_prepared, batch_format="pyarrow", num_cpus=1, fn_kwargs=kwargs)
    return Inputs("prepared", f"{path} ({split})", rows, _same_classes(meta["num_classes"], num_classes, str(path)), ds)


def _image_folder(path: Path, image_shape: list[int], resize: str) -> Inputs:
    import ray

    files = image_files(path)
    items = [{"index": i, "path": str(f)} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / FILES_PER_BLOCK))
    ds = ds.map_batches(
        decode_files,
        batch_size=FILES_PER_BLOCK,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={"shape": tuple(image_shape), "resize": resize},
    )
    return Inputs("images", str(path), len(items), False, ds)


def _source(spec: str, image_shape: list[int], num_classes: int, resize: str) -> Inputs:
    import ray

    plan = plan_source(spec)
    pieces = [p for c in plan.chunks for p in split_chunk(c, SOURCE_PIECE_ROWS)]
    ds = ray.data.from_items([{"piece": i} for i in range(len(pieces))], override_num_blocks=len(pieces))
    ds = ds.map_batches(
        decode_pieces,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={"pieces": pieces, "shape": tuple(image_shape), "resize": resize},
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


# ------------------------------------------------------------------ decoding (Ray Data UDFs)


def size_error(img: np.ndarray, shape: tuple[int, ...]) -> str:
    """'' when ``img`` has the model's HWC shape, else the reason naming both sizes."""
    if tuple(img.shape) == tuple(shape):
        return ""
    return f"image is {'x'.join(map(str, img.shape))} (HxWxC), the model takes {'x'.join(map(str, shape))}"


def to_model_size(img: np.ndarray, shape: tuple[int, ...], resize: str) -> tuple[np.ndarray, str, str]:
    """``(image, resized_from, error)``: ``img`` as the model takes it. One of another size
    goes through ``resize`` (the model's preprocessing) and ``resized_from`` says its size
    ("HxW"); what still does not fit (another channel count) is an error naming both."""
    if tuple(img.shape) == tuple(shape) or not resize or img.shape[2] != shape[2]:
        return img, "", size_error(img, shape)
    out = preprocess_image(img, resize)
    return out, f"{img.shape[0]}x{img.shape[1]}", size_error(out, shape)


def _rows(
    index: list[int],
    names: list[str],
    labels: list[int],
    images: list[np.ndarray | None],
    errors: list[str],
    shape: tuple[int, ...],
    resize: str = "",
) -> dict[str, np.ndarray]:
    """Decoded rows as one batch; a bad row keeps its reason and a blank image of the
    model's size, so every image column is one fixed-shape tensor."""
    out = np.zeros((len(images), *shape), np.uint8)
    errors, resized = list(errors), [""] * len(images)
    for i, img in enumerate(images):
        if errors[i]:
            continue
        img, resized[i], errors[i] = to_model_size(img, shape, resize)
        if not errors[i]:
            out[i] = img
    return {
        "index": np.asarray(index, np.int64),
        "name": np.asarray([str(n) for n in names], dtype=object),
        "label": np.asarray(labels, np.int64),
        "error": np.asarray(errors, dtype=object),
        "resized_from": np.asarray(resized, dtype=object),
        "image": out,
    }


def decode_prepared(
    table: Any, *, shape: tuple[int, ...], model_shape: tuple[int, ...], resize: str
) -> dict[str, np.ndarray]:
    """A prepared split's Arrow rows (raw pixels, all of the stored ``shape``) -> rows to
    predict, the whole batch brought to ``model_shape`` at once when the two differ."""
    import torch

    rows = decode_batch(table, shape)
    n, images = len(rows["label"]), rows["image"]
    was = ""
    if tuple(shape) != tuple(model_shape):
        images = preprocess(torch.from_numpy(np.require(images, requirements=["C", "W"])), resize).numpy()
        was = f"{shape[0]}x{shape[1]}"
    return {
        "index": rows["index"].astype(np.int64),
        "name": rows["name"].astype(object),
        "label": rows["label"],
        "error": np.full(n, "", dtype=object),
        "resized_from": np.full(n, was, dtype=object),
        "image": images,
    }


def decode_files(batch: dict[str, np.ndarray], *, shape: tuple[int, ...], resize: str = "") -> dict[str, np.ndarray]:
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
    return _rows(batch["index"].tolist(), names, [NO_LABEL] * len(names), images, errors, shape, resize)


def decode_pieces(
    batch: dict[str, np.ndarray], *, pieces: list[Any], shape: tuple[int, ...], resize: str = ""
) -> dict[str, np.ndarray]:
    """Pieces of a prepare source (CIFAR pickles, class folders, Parquet) -> rows to predict,
    with the source's labels; bad rows carry the source reader's reason."""

    parts = []
    for i in batch["piece"]:
        chunk = pieces[int(i)]
        decoded, labels = load_chunk(chunk, shape[2])
        index = list(range(chunk.start, chunk.start + chunk.count))
        parts.append(_rows(index, decoded.names, labels.tolist(), decoded.images, decoded.errors, shape, resize))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
