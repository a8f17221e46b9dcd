"""Readers for every source effray accepts, split into chunks that Ray tasks decode.

A source is planned once on the driver (cheap: labels and row counts only) and then
loaded chunk by chunk in parallel. Source specs:

- ``cifar10:DIR`` / ``cifar100:DIR`` — torchvision's download format (python pickles);
- ``folder:DIR`` — one subfolder of images per class;
- ``parquet:PATH`` — a file or folder with encoded image bytes (or raw pixels) + label;
- ``synthetic:N`` — N seeded, class-learnable images for smoke tests;
- a bare path — detected from what it contains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effray.data.cifar_pickles import cifar_layout, read_cifar_pickle
from effray.data.image_bytes import (  # noqa: F401  (decode_image: callers import it from here)
    DecodedChunk,
    decode_all,
    decode_image,
    raw_pixels,
)
from effray.errors import EffrayError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHUNK_ROWS = 5000
SYNTHETIC_SIZE = 32


@dataclass(frozen=True)
class Chunk:
    """A slice of the source that one Ray task decodes: rows [start, start+count)."""

    kind: str
    start: int
    count: int
    path: str = ""
    fixed_split: str = ""  # e.g. "test" for CIFAR's test_batch; "" means train/val by the plan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourcePlan:
    """Everything the driver needs to assign splits and launch decode tasks."""

    kind: str
    spec: str
    classes: list[str]
    labels: np.ndarray  # int64 label of every row, in row order
    chunks: list[Chunk]
    checksum: str
    labels_checked: bool = True  # False when the class list was inferred from the labels


def parse_classes(text: str | None) -> list[str] | None:
    """``cifar10``, ``cifar100``, an integer count or a comma list -> class names."""
    if text is None or text == "":
        return None
    if text == "cifar10":
        return list(CIFAR10_CLASSES)
    if text.isdigit():
        return [str(i) for i in range(int(text))]
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(names) < 2:
        raise EffrayError(f"--classes {text!r} names fewer than 2 classes; give cifar10, a count, or a,b,c")
    return names


def plan_source(spec: str, classes: str | None = None, download: bool = False, seed: int = 0) -> SourcePlan:
    """Resolve a source spec and plan its chunks; errors name the path and the fix."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        if not rest.isdigit() or int(rest) < 1:
            raise EffrayError(f"synthetic source needs a positive count, e.g. synthetic:500 (got {spec!r})")
        return _plan_synthetic(int(rest), parse_classes(classes) or list(CIFAR10_CLASSES), seed)
    if kind in ("cifar10", "cifar100", "folder", "parquet") and rest:
        path = Path(rest)
    else:
        kind, path = "", Path(spec)
    if download:
        if kind not in ("cifar10", "cifar100"):
            raise EffrayError("--download works with cifar10:DIR or cifar100:DIR sources only")
        _download(kind, path)
    if not path.exists():
        raise EffrayError(
            f"source path {str(path)!r} does not exist; check the path (or use --download for cifar10:/cifar100:)"
        )
    kind = kind or _detect(path)
    if kind in ("cifar10", "cifar100"):
        return _plan_cifar(kind, path)
    if kind == "folder":
        return _plan_folder(path, parse_classes(classes))
    return _plan_parquet(path, parse_classes(classes))


def load_chunk(chunk: Chunk, channels: int | None) -> tuple[DecodedChunk, np.ndarray]:
    """Decode one chunk (runs inside a Ray task). Returns decoded rows and their labels."""
    if chunk.kind == "synthetic":
        return _load_synthetic(chunk)
    if chunk.kind in ("cifar10", "cifar100"):
        return _load_cifar(chunk)
    if chunk.kind == "folder":
        files = chunk.extra["files"]
        encoded = [Path(f).read_bytes() if Path(f).is_file() else None for f in files]
        decoded = decode_all(encoded, files, channels)
        return decoded, np.asarray(chunk.extra["labels"], dtype=np.int64)
    return _load_parquet(chunk, channels)


# ---------------------------------------------------------------- detection & download


def _detect(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        raise EffrayError(
            f"cannot tell what {str(path)!r} is; give a .parquet file, a folder, or prefix cifar10:/folder:/parquet:"
        )
    for kind, sub, marker in (
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("cifar100", "cifar-100-python", "train"),
    ):
        if (path / marker).is_file() or (path / sub / marker).is_file():
            return kind
    if any(path.rglob("*.parquet")):
        return "parquet"
    return "folder"


def _download(kind: str, root: Path) -> None:
    import torchvision  # deferred: only --download needs it

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise EffrayError(
            f"could not download {kind} into {root}: {exc}; download it elsewhere and pass {kind}:DIR"
        ) from None


def _sha256_files(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for f in files:
        if root is not None:
            h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- CIFAR pickles


def _plan_cifar(kind: str, path: Path) -> SourcePlan:
    base, files, meta_name, names_key = cifar_layout(kind, path)
    present = [(base / f, split) for f, split in files if (base / f).is_file()]
    if not present:
        raise EffrayError(f"no CIFAR batch files in {base}; expected {files[0][0]} etc. (torchvision's format)")
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    classes = list(CIFAR10_CLASSES) if kind == "cifar10" else [str(i) for i in range(100)]
    if (base / meta_name).is_file():
        names = read_cifar_pickle(base / meta_name).get(names_key)
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    labels, chunks, start = [], [], 0
    for f, split in present:
        batch = read_cifar_pickle(f)
        if label_key not in batch or "data" not in batch:
            raise EffrayError(f"CIFAR batch {f} lacks '{label_key}'/'data'; is it {kind}?")
        lab = np.asarray(batch[label_key], dtype=np.int64)
        labels.append(lab)
        chunks.append(Chunk(kind, start, len(lab), str(f), split, {"label_key": label_key}))
        start += len(lab)
    return SourcePlan(
        kind, f"{kind}:{path}", classes, np.concatenate(labels), chunks, _sha256_files([f for f, _ in present])
    )


def _load_cifar(chunk: Chunk) -> tuple[DecodedChunk, np.ndarray]:
    batch = read_cifar_pickle(Path(chunk.path))
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] % 3 != 0:
        raise EffrayError(f"CIFAR batch {chunk.path} has data of shape {data.shape}; expected (N, 3*H*W)")
    side = int(round((data.shape[1] // 3) ** 0.5))
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in batch.get("filenames", [])]
    names = names if len(names) == len(images) else [f"{Path(chunk.path).name}[{i}]" for i in range(len(images))]
    labels = np.asarray(batch[chunk.extra["label_key"]], dtype=np.int64)
    return DecodedChunk(list(images), [""] * len(images), names), labels


# ---------------------------------------------------------------- folder of images


def _plan_folder(path: Path, classes: list[str] | None) -> SourcePlan:
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise EffrayError(f"folder source {str(path)!r} has no class subfolders; lay it out as DIR/<class>/<image>")
    found = [d.name for d in class_dirs]
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise EffrayError(f"folders {unknown} of {path} are not among --classes; add them or remove the folders")
    files, labels = [], []
    for d in class_dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(classes.index(d.name))
    if not files:
        raise EffrayError(f"folder source {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    chunks = [
        Chunk(
            "folder",
            s,
            len(files[s : s + CHUNK_ROWS]),
            str(path),
            extra={"files": [str(f) for f in files[s : s + CHUNK_ROWS]], "labels": labels[s : s + CHUNK_ROWS]},
        )
        for s in range(0, len(files), CHUNK_ROWS)
    ]
    return SourcePlan(
        "folder", f"folder:{path}", classes, np.asarray(labels, dtype=np.int64), chunks, _sha256_files(files, root=path)
    )


# ---------------------------------------------------------------- parquet


_LABEL_COLUMNS = ("label", "labels", "fine_label")


def _parquet_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise EffrayError(f"no .parquet files under {str(path)!r}")
    return files


def _label_column(schema: pa.Schema, f: Path) -> str:
    for name in _LABEL_COLUMNS:
        if name in schema.names:
            return name
    raise EffrayError(
        f"{f} has no label column (one of {', '.join(_LABEL_COLUMNS)}); columns: {', '.join(schema.names)}"
    )


def _plan_parquet(path: Path, classes: list[str] | None) -> SourcePlan:
    files = _parquet_files(path)
    labels, chunks, start, names = [], [], 0, []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001
            raise EffrayError(f"cannot read parquet file {f}: {exc}; is it a Parquet file?") from None
        schema = pf.schema_arrow
        if "image" not in schema.names:
            raise EffrayError(f"{f} has no 'image' column; columns: {', '.join(schema.names)}")
        label_col = _label_column(schema, f)
        cols = [label_col] + (["name"] if "name" in schema.names else [])
        for rg in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(rg, columns=cols)
            n = table.num_rows
            if n == 0:
                continue
            labels.append(table.column(label_col).to_numpy(zero_copy_only=False).astype(np.int64))
            if "name" in table.column_names:
                names.extend(table.column("name").to_pylist())
            for off in range(0, n, CHUNK_ROWS):
                cnt = min(CHUNK_ROWS, n - off)
                chunks.append(
                    Chunk(
                        "parquet",
                        start + off,
                        cnt,
                        str(f),
                        extra={"row_group": rg, "offset": off, "label_col": label_col},
                    )
                )
            start += n
    if not chunks:
        raise EffrayError(f"parquet source {str(path)!r} has no rows")
    all_labels = np.concatenate(labels)
    meta_file = path / "meta.json" if path.is_dir() else None
    if meta_file is not None and meta_file.is_file():  # an effray canonical dataset: raw pixels
        import json

        meta = json.loads(meta_file.read_text())
        chunks = [
            Chunk(c.kind, c.start, c.count, c.path, c.fixed_split, {**c.extra, "raw_shape": meta["image_shape"]})
            for c in chunks
        ]
        classes = classes or list(meta["classes"])
    checked = True
    if classes is None:
        classes = _classes_from_names(names, all_labels)
    if classes is None:
        checked = False
        classes = [str(i) for i in range(max(int(all_labels.max()) + 1, 2))]
    return SourcePlan("parquet", f"parquet:{path}", classes, all_labels, chunks, _sha256_files(files), checked)


def _classes_from_names(names: list[str], labels: np.ndarray) -> list[str] | None:
    """Class names from paths like ``train/<class>/0001.jpg`` when they map 1:1 to labels."""
    if len(names) != len(labels) or not names:
        return None
    mapping: dict[int, str] = {}
    for name, label in zip(names, labels.tolist()):
        parts = str(name).replace("\\", "/").split("/")
        if len(parts) < 2 or mapping.setdefault(label, parts[-2]) != parts[-2]:
            return None
    if sorted(mapping) != list(range(len(mapping))) or len(set(mapping.values())) != len(mapping):
        return None
    return [mapping[i] for i in range(len(mapping))]


def _load_parquet(chunk: Chunk, channels: int | None) -> tuple[DecodedChunk, np.ndarray]:
    pf = pq.ParquetFile(chunk.path)
    table = pf.read_row_group(chunk.extra["row_group"]).slice(chunk.extra["offset"], chunk.count)
    labels = table.column(chunk.extra["label_col"]).to_numpy(zero_copy_only=False).astype(np.int64)
    names = (
        table.column("name").to_pylist()
        if "name" in table.column_names
        else [f"{Path(chunk.path).name}#row{chunk.start + i}" for i in range(chunk.count)]
    )
    column = table.column("image")
    if pa.types.is_struct(column.type):  # Hugging Face style {"bytes", "path"}
        column = pa.chunked_array([c.field("bytes") for c in column.chunks])
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
        raw = [None if v is None else np.asarray(v, dtype=np.uint8) for v in column.to_pylist()]
        return raw_pixels(raw, names, chunk.extra.get("raw_shape")), labels
    return decode_all(column.to_pylist(), names, channels, raw_shape=chunk.extra.get("raw_shape")), labels


# ---------------------------------------------------------------- synthetic


def _plan_synthetic(n: int, classes: list[str], seed: int) -> SourcePlan:
    labels = np.arange(n, dtype=np.int64) % len(classes)
    chunks = [
        Chunk("synthetic", s, min(CHUNK_ROWS, n - s), extra={"seed": seed, "num_classes": len(classes)})
        for s in range(0, n, CHUNK_ROWS)
    ]
    checksum = "sha256:" + hashlib.sha256(f"synthetic:{n}:{seed}:{len(classes)}".encode()).hexdigest()
    return SourcePlan("synthetic", f"synthetic:{n}", classes, labels, chunks, checksum)


def synthetic_images(
    labels: np.ndarray, num_classes: int, rng: np.random.Generator, size: int = SYNTHETIC_SIZE
) -> np.ndarray:
    """Class-learnable images: each class has its own colour and stripe orientation, plus
    noise and a random shift, so a small net can learn them but not trivially by one pixel."""
    n = len(labels)
    hues = np.linspace(0, 1, num_classes, endpoint=False)
    base = np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], axis=1)
    angle = np.pi * np.arange(num_classes) / num_classes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shift = rng.uniform(0, 1, size=(n, 1, 1))
    a = angle[labels][:, None, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * (np.cos(a) * xx + np.sin(a) * yy + shift))
    img = base[labels][:, None, None, :] * (0.6 + 0.4 * stripes[..., None])
    img = img + rng.normal(0, 0.08, size=img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _load_synthetic(chunk: Chunk) -> tuple[DecodedChunk, np.ndarray]:
    labels = np.arange(chunk.start, chunk.start + chunk.count, dtype=np.int64) % chunk.extra["num_classes"]
    rng = np.random.default_rng([chunk.extra["seed"], chunk.start])
    images = synthetic_images(labels, chunk.extra["num_classes"], rng)
    names = [f"synthetic#{chunk.start + i}" for i in range(chunk.count)]
    return DecodedChunk(list(images), [""] * chunk.count, names), labels
