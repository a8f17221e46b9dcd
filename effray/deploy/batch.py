"""``effray predict``: batch inference on Ray Data.

read -> decode -> the model in an actor pool -> ``OUT/predictions.parquet`` +
``OUT/skipped.parquet``. An image that can't be used (unreadable, corrupt, the wrong size)
is a skipped row with its reason, never an error: one bad file in a million must not cost
the other 999,999. Images travel as uint8 (a quarter of float32's bytes) and each actor's
:class:`~effray.deploy.model.Deployable`, loaded once in ``__init__``, normalises them on
its device. The driver writes the results as they stream in (a few numbers per row, so one
file and no storage shared between nodes) into a hidden directory renamed into place at the
end: ``OUT`` appears whole or not at all.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import replace_dir, temp_sibling, write_json
from effray.config import option, require, to_dict
from effray.console import say
from effray.data.pipeline import data_context, decode_batch
from effray.data.prepare import load_meta, split_files
from effray.data.sources import IMAGE_SUFFIXES, Chunk, decode_image, load_chunk, plan_source
from effray.deploy.model import load_deployable
from effray.errors import EffrayError

FILES_PER_BLOCK = 256  # image files one decode task reads: enough to amortise a task, small enough to spread out
SOURCE_PIECE_ROWS = 1024  # rows of a prepare source one decode task takes (CIFAR pickles: a whole file)
NO_LABEL = -1


@dataclass(frozen=True)
class PredictConfig:
    """Which model over which images, where the predictions go."""

    model: str = option("", "checkpoint, compressed artifact or `effray export` output")
    data: str = option(
        "",
        "a prepared dataset, any `effray data prepare` source (CIFAR folder, image folder, Parquet) or a folder of "
        "images",
    )
    out: str = option(
        "",
        "output directory: predictions.parquet, skipped.parquet (unusable images and why), predict.json; written "
        "whole or not at all",
    )
    split: str = option("val", "split to predict when --data is a prepared dataset")
    kind: str = option(
        "", "which file of an export directory: torch, onnx, onnx-int8, torch-int8 ('' = the first present)"
    )
    batch_size: int = option(256, "images per model call")
    actors: int = option(0, "model replicas in the actor pool (0 = one per GPU, else one per 2 CPUs)")
    gpus_per_actor: float = option(-1.0, "GPUs per model actor (-1 = 1 when the cluster has GPUs, else 0)")
    cpus_per_actor: float = option(1.0, "CPUs per model actor (torch runs that many threads in it)")
    top_k: int = option(5, "classes kept per row, most probable first")
    overwrite: bool = option(False, "replace an existing --out directory")

    def validate(self) -> None:
        require(bool(self.model), "--model PATH is required (a checkpoint, artifact or `effray export` output)")
        require(bool(self.data), "--data is required (a prepared dataset, a prepare source or a folder of images)")
        require(bool(self.out), "--out DIR is required (predictions.parquet goes there)")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.actors >= 0, f"--actors must be >= 0 (0 = auto), got {self.actors}")
        require(self.top_k > 0, f"--top-k must be a positive integer, got {self.top_k}")
        require(
            self.gpus_per_actor == -1 or self.gpus_per_actor >= 0,
            f"--gpus-per-actor must be >= 0 (or -1 = auto), got {self.gpus_per_actor}",
        )
        require(self.cpus_per_actor > 0, f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")


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


# ------------------------------------------------------------------ the model actor


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the Deployable's arithmetic), as float32."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """One model per actor, loaded once; scores the good rows of each batch and passes the
    skipped ones through with their reason."""

    def __init__(self, model: str, kind: str, top_k: int, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.deployable = load_deployable(model, device="auto", kind=kind)
        self.classes = np.asarray(self.deployable.info.classes, dtype=object)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, k = len(ok), self.top_k
        top = np.full((n, k), NO_LABEL, np.int64)
        top_p = np.zeros((n, k), np.float32)
        started = time.perf_counter()
        if ok.any():
            logits = self.deployable.logits(batch["image"][ok])
            probs = softmax(logits)
            order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            top[ok], top_p[ok] = order, np.take_along_axis(probs, order, axis=1)
        seconds = time.perf_counter() - started
        predicted = top[:, 0]
        return {
            "index": batch["index"],
            "name": batch["name"],
            "label": batch["label"],
            "error": batch["error"],
            "predicted": predicted,
            "class_name": np.where(ok, self.classes[np.maximum(predicted, 0)], ""),
            "probability": top_p[:, 0],
            "top_k_labels": top,
            "top_k_probabilities": top_p,
            # this call's model time, spread over its rows: the sum over rows is the time in the model
            "model_s": np.where(ok, seconds / max(1, int(ok.sum())), 0.0),
        }


def resolve_resources(cfg: PredictConfig, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor): ``-1`` GPUs means one when the cluster has any; ``0``
    actors means one per GPU share, else one per 2 CPUs."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
    require(
        gpus == 0 or cluster.get("GPU", 0) >= gpus,
        f"--gpus-per-actor {gpus:g} but the cluster has {cluster.get('GPU', 0):g} GPUs; pass --gpus-per-actor 0 to "
        "run on CPUs",
    )
    if cfg.actors:
        return cfg.actors, gpus
    if gpus > 0:
        return max(1, int(cluster["GPU"] // gpus)), gpus
    return max(1, int(cluster.get("CPU", 1)) // 2), gpus


# ------------------------------------------------------------------ the command


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Predict every row of ``--data`` with ``--model`` on the current Ray cluster; write
    ``OUT/predictions.parquet``, ``OUT/skipped.parquet`` and ``OUT/predict.json``."""
    import ray

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EffrayError(f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another --out")
    info = load_deployable(cfg.model, device="cpu", kind=cfg.kind).info  # a bad model fails here, in one line
    require(cfg.top_k <= info.num_classes, f"--top-k {cfg.top_k} is more than the model's {info.num_classes} classes")
    inputs = plan_inputs(cfg.data, cfg.split, info.image_shape, info.num_classes)
    require(inputs.rows > 0, f"{inputs.spec} has no rows to predict")
    actors, gpus = resolve_resources(cfg, ray.cluster_resources())
    scored = inputs.dataset.map_batches(
        Classifier,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "model": str(Path(cfg.model).absolute()),
            "kind": cfg.kind,
            "top_k": cfg.top_k,
            "threads": int(cfg.cpus_per_actor),
        },
    )
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        tally = write_predictions(scored.iter_batches(batch_size=None, batch_format="numpy"), tmp, inputs.labelled)
        seconds = time.perf_counter() - started
        result = _result(info, inputs, tally, seconds, actors, gpus, out)
        write_json(tmp / "predict.json", {**result, "config": to_dict(cfg), "model_info": info.to_dict()})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"[effray] predict: {tally['predicted']} images in {seconds:.1f} s (actor start included), "
        f"{result['images_per_s']:.0f} images/s ({actors} actor{'s' if actors > 1 else ''}, {gpus:g} GPU each; in "
        "the model "
        f"{result['model_images_per_s']:.0f} images/s per actor); {tally['skipped']} skipped -> {out}"
    )
    return result


def write_predictions(batches: Any, out_dir: Path, labelled: bool) -> dict[str, Any]:
    """Stream scored batches into ``predictions.parquet`` and ``skipped.parquet`` under
    ``out_dir``; returns the counts (and correct predictions when ``labelled``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pred_schema = pa.schema(
        [
            ("index", pa.int64()),
            ("name", pa.string()),
            ("label", pa.int64()),
            ("predicted", pa.int64()),
            ("class_name", pa.string()),
            ("probability", pa.float32()),
            ("top_k_labels", pa.list_(pa.int64())),
            ("top_k_probabilities", pa.list_(pa.float32())),
        ]
    )
    skip_schema = pa.schema([("index", pa.int64()), ("name", pa.string()), ("reason", pa.string())])
    tally: dict[str, Any] = {"predicted": 0, "skipped": 0, "correct": 0, "model_s": 0.0, "skipped_examples": []}
    with (
        pq.ParquetWriter(out_dir / "predictions.parquet", pred_schema) as preds,
        pq.ParquetWriter(out_dir / "skipped.parquet", skip_schema) as skipped,
    ):
        for b in batches:
            ok = b["error"] == ""
            if (~ok).any():
                rows = {"index": b["index"][~ok], "name": b["name"][~ok].tolist(), "reason": b["error"][~ok].tolist()}
                skipped.write_table(pa.table(rows, schema=skip_schema))
                tally["skipped"] += int((~ok).sum())
                tally["skipped_examples"] += [f"{n}: {r}" for n, r in zip(rows["name"], rows["reason"])][
                    : 10 - len(tally["skipped_examples"])
                ]
            if not ok.any():
                continue
            k = b["top_k_labels"].shape[1]
            labels = b["label"][ok]
            rows = {
                "index": b["index"][ok],
                "name": b["name"][ok].tolist(),
                "label": pa.array(labels, pa.int64(), mask=labels == NO_LABEL),
                "predicted": b["predicted"][ok],
                "class_name": b["class_name"][ok].tolist(),
                "probability": b["probability"][ok],
                "top_k_labels": pa.FixedSizeListArray.from_arrays(pa.array(b["top_k_labels"][ok].ravel()), k).cast(
                    pa.list_(pa.int64())
                ),
                "top_k_probabilities": pa.FixedSizeListArray.from_arrays(
                    pa.array(b["top_k_probabilities"][ok].ravel()), k
                ).cast(pa.list_(pa.float32())),
            }
            preds.write_table(pa.table(rows, schema=pred_schema))
            tally["predicted"] += int(ok.sum())
            tally["model_s"] += float(b["model_s"][ok].sum())
            if labelled:
                tally["correct"] += int((b["predicted"][ok] == labels).sum())
    return tally


def _result(
    info: Any, inputs: Inputs, tally: dict[str, Any], seconds: float, actors: int, gpus: float, out: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "out": str(out.absolute()),
        "predictions": str((out / "predictions.parquet").absolute()),
        "skipped_file": str((out / "skipped.parquet").absolute()),
        "data": inputs.spec,
        "data_kind": inputs.kind,
        "rows": tally["predicted"] + tally["skipped"],
        "predicted": tally["predicted"],
        "skipped": tally["skipped"],
        "skipped_examples": tally["skipped_examples"],
        "seconds": round(seconds, 3),
        "images_per_s": round(tally["predicted"] / max(seconds, 1e-9), 1),
        "model_images_per_s": round(tally["predicted"] / max(tally["model_s"], 1e-9), 1) if tally["predicted"] else 0.0,
        "actors": actors,
        "gpus_per_actor": gpus,
        "model": {"kind": info.kind, "source": info.source},
    }
    if inputs.labelled and tally["predicted"]:
        result["accuracy"] = tally["correct"] / tally["predicted"]
    return json.loads(json.dumps(result, default=str))
