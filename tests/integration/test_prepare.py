"""`effray data prepare` on every source kind, on local Ray, with real and fixture data."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from effray.cli import main
from effray.data.prepare import PrepareConfig, load_meta, prepare, split_files

pytestmark = pytest.mark.usefixtures("ray_session")


def _read(out: Path, split: str) -> pa.Table:
    return pq.read_table(split_files(out, split))


def _pixels(table: pa.Table, shape) -> np.ndarray:
    return np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in table.column("image").to_pylist()])


def _images(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 10


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_real_cifar_parquet(tiny_cifar, cifar_parquet):
    meta = load_meta(tiny_cifar)
    assert meta["counts"] == {"train": 540, "val": 60}
    # stratified: each class holds out 10 % of its own rows in the slice (the shared file
    # interleaves the classes, so there 6 of each; another row order gives other counts)
    per_class = np.bincount(
        pq.read_table(cifar_parquet, columns=["label"]).slice(0, 600).column("label").to_numpy(), minlength=10
    )
    val_per_class = np.array(meta["counts_per_class"]["val"])
    assert val_per_class.sum() == 60 and np.all(np.abs(val_per_class - 0.1 * per_class) < 1), (val_per_class, per_class)
    assert meta["classes"][:3] == ["airplane", "automobile", "bird"]
    assert meta["image_shape"] == [32, 32, 3]
    train = _read(tiny_cifar, "train")
    val = _read(tiny_cifar, "val")
    assert not set(train.column("index").to_pylist()) & set(val.column("index").to_pylist())
    pix = _pixels(train, (32, 32, 3)).astype(np.float64) / 255
    np.testing.assert_allclose(meta["mean"], pix.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(meta["std"], pix.std(axis=(0, 1, 2)), atol=1e-6)
    # decoded pixels equal PIL's decode of the same source row (PNG in the shared file)
    src = pq.read_table(cifar_parquet).slice(0, 600)
    i = train.column("index")[0].as_py()
    expected = np.asarray(Image.open(io.BytesIO(src.column("image")[i].as_py())).convert("RGB"))
    np.testing.assert_array_equal(_pixels(train.slice(0, 1), (32, 32, 3))[0], expected)
    assert train.column("label")[0].as_py() == src.column("label")[i].as_py()


def test_torchvision_cifar10_pickles_roundtrip(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    all_imgs = []
    for name, seed in [("data_batch_1", 1), ("data_batch_2", 2), ("test_batch", 3)]:
        imgs, labels = _images(40, seed)
        all_imgs.append(imgs)
        data = imgs.transpose(0, 3, 1, 2).reshape(40, -1)
        batch = {
            b"data": data,
            b"labels": labels.tolist(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(40)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    out = tmp_path / "out"
    meta = prepare(PrepareConfig(source=f"cifar10:{tmp_path}", out=str(out), val_fraction=0.25))
    assert meta["counts"] == {"train": 60, "val": 20, "test": 40}  # the source's own test split, none carved
    assert meta["test_split"] == "source" and meta["test_fraction"] == 0.0 and meta["classes"][0] == "c0"
    test = _read(out, "test")
    np.testing.assert_array_equal(_pixels(test, (32, 32, 3)), all_imgs[2][np.asarray(test.column("index")) - 80])


def test_cifar_pickle_with_code_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    assert main(["data", "prepare", "--source", f"cifar10:{tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_cifar100_pickles(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    imgs, _ = _images(30)
    labels = (np.arange(30) * 7) % 100
    (root / "train").write_bytes(
        pickle.dumps({b"data": imgs.transpose(0, 3, 1, 2).reshape(30, -1), b"fine_labels": labels.tolist()})
    )
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    meta = prepare(PrepareConfig(source=str(tmp_path), out=str(tmp_path / "o"), val_fraction=0.0, test_fraction=0.0))
    assert meta["num_classes"] == 100 and meta["counts"] == {"train": 30}
    assert sorted(_read(tmp_path / "o", "train").column("label").to_pylist()) == sorted(labels.tolist())


def test_image_folder_roundtrip(tmp_path):
    imgs, labels = _images(24, size=16)
    for i, (img, label) in enumerate(zip(imgs, labels)):
        d = tmp_path / "src" / f"class{label % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    meta = prepare(
        PrepareConfig(source=f"folder:{tmp_path / 'src'}", out=str(tmp_path / "o"), val_fraction=0.0, test_fraction=0.0)
    )
    assert meta["classes"] == ["class0", "class1", "class2"] and meta["image_shape"] == [16, 16, 3]
    table = _read(tmp_path / "o", "train")
    by_name = dict(zip(table.column("name").to_pylist(), _pixels(table, (16, 16, 3))))
    np.testing.assert_array_equal(by_name[str(tmp_path / "src" / "class1" / "004.png")], imgs[4])


def test_raw_pixel_parquet_and_canonical_as_source(tmp_path, tiny_cifar):
    imgs, labels = _images(20)
    pq.write_table(pa.table({"image": [i.tobytes() for i in imgs], "label": labels}), tmp_path / "raw.parquet")
    prepare(
        PrepareConfig(
            source=str(tmp_path / "raw.parquet"), out=str(tmp_path / "o"), val_fraction=0.0, test_fraction=0.0
        )
    )
    table = _read(tmp_path / "o", "train")
    np.testing.assert_array_equal(_pixels(table, (32, 32, 3)), imgs[np.asarray(table.column("index"))])
    # a prepared dataset is itself a valid Parquet source
    meta = prepare(
        PrepareConfig(source=f"parquet:{tiny_cifar}", out=str(tmp_path / "again"), val_fraction=0.0, test_fraction=0.0)
    )
    assert meta["counts"]["train"] == 600 and meta["classes"] == load_meta(tiny_cifar)["classes"]


def test_synthetic_is_deterministic_and_a_test_split_is_carved_by_default(tmp_path):
    a = prepare(PrepareConfig(source="synthetic:50", out=str(tmp_path / "a"), seed=3))
    prepare(PrepareConfig(source="synthetic:50", out=str(tmp_path / "b"), seed=3))
    assert a["counts"] == {"train": 40, "val": 5, "test": 5} and a["test_split"] == "carved"
    for split in ("train", "val", "test"):
        assert _read(tmp_path / "a", split).equals(_read(tmp_path / "b", split))
    # stratified: every class gives its share to test, and no row is in two splits
    assert sum(a["counts_per_class"]["test"]) == 5 and max(a["counts_per_class"]["test"]) == 1
    rows = [set(_read(tmp_path / "a", s).column("index").to_pylist()) for s in ("train", "val", "test")]
    assert sum(map(len, rows)) == 50 and len(set.union(*rows)) == 50


def _bad_parquet(tmp_path: Path, kind: str) -> Path:
    imgs, labels = _images(12)
    rows = [_png(i) for i in imgs]
    if kind == "corrupt":
        rows[5] = b"\x89PNG\r\n\x1a\n garbage"
    elif kind == "label":
        labels = labels.copy()
        labels[7] = 12
    elif kind == "size":
        rows[3] = _png(np.zeros((16, 16, 3), np.uint8))
    names = [f"train/c{label}/{i}.png" for i, label in enumerate(labels)]
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(pa.table({"image": rows, "label": labels, "name": names}), path)
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("corrupt", "bad row 5 (train/c5/5.png)"),
        ("label", "label 12 outside the class range 0..9"),
        ("size", "mixed image sizes"),
    ],
)
def test_bad_rows_fail_cleanly_or_are_skipped(tmp_path, capsys, kind, fragment):
    src = _bad_parquet(tmp_path, kind)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--source", str(src), "--out", str(out), "--classes", "cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effray: error:") and fragment in err and "--skip-bad" in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(src),
                "--out",
                str(out),
                "--classes",
                "cifar10",
                "--skip-bad",
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
            ]
        )
        == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_bad"] == 1 and meta["counts"]["train"] == 11


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--source", "/nonexistent/x"], "does not exist"),
        (["--source", "synthetic:0"], "positive count"),
        (["--source", "synthetic:10", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--source", "synthetic:10", "--test-fraction", "-0.1"], "--test-fraction must be in [0, 1)"),
        (["--source", "synthetic:10", "--val-fraction", "0.5", "--test-fraction", "0.5"], "leave no training rows"),
        (["--source", "EMPTY"], "has no class subfolders"),
    ],
)
def test_bad_sources(tmp_path, capsys, args, fragment):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    assert main(["data", "prepare", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["data", "prepare", "--source", "synthetic:20", "--out", str(out)]) == 0
    before = (out / "meta.json").read_text()
    assert main(["data", "prepare", "--source", "synthetic:30", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "meta.json").read_text() == before
    assert main(["data", "prepare", "--source", "synthetic:30", "--out", str(out), "--overwrite"]) == 0
    assert load_meta(out)["counts"] == {"train": 24, "val": 3, "test": 3}


def _labelled_parquet(tmp_path: Path, labels: np.ndarray, names: list[str] | None = None) -> Path:
    imgs, _ = _images(len(labels))
    columns = {"image": [i.tobytes() for i in imgs], "label": labels}
    path = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({**columns, **({"name": names} if names else {})}), path)
    return path


def test_a_stray_label_that_would_leave_empty_classes_is_one_line_naming_the_row(tmp_path, capsys):
    """Classes inferred from the labels: one label 57 among 0..9 would make 47 empty classes."""
    labels = np.arange(40) % 10
    labels[13] = 57
    out = tmp_path / "out"
    assert main(["data", "prepare", "--source", str(_labelled_parquet(tmp_path, labels)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "row 13 (label 57)" in err
        and "47 of the 58 classes 0..57 empty, from class 10 on" in err
    )
    assert "--classes" in err and not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # named classes: the row is out of range, and --skip-bad drops it
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(tmp_path / "labelled.parquet"),
                "--out",
                str(out),
                "--classes",
                "10",
                "--skip-bad",
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
            ]
        )
        == 0
    )
    assert load_meta(out)["counts"]["train"] == 39 and load_meta(out)["warnings"] == []


def test_a_label_that_disagrees_with_the_class_in_its_path_is_refused(tmp_path, capsys):
    labels = np.arange(30) % 3
    names = [f"train/{['cat', 'dog', 'ship'][c]}/{i}.png" for i, c in enumerate(labels)]
    labels = labels.copy()
    labels[4] = 2  # filed under dog, labelled ship
    src = _labelled_parquet(tmp_path, labels, names)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--source", str(src), "--out", str(out), "--classes", "cat,dog,ship"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 4 (train/dog/4.png)" in err
    assert "label 2 (ship) disagrees with the class 'dog'" in err and "--skip-bad" in err and not out.exists()
    assert (
        main(["data", "prepare", "--source", str(src), "--out", str(out), "--classes", "cat,dog,ship", "--skip-bad"])
        == 0
    )
    assert load_meta(out)["skipped_bad"] == 1


def test_empty_and_small_named_classes_are_warnings_with_counts(tmp_path, capsys):
    labels = np.concatenate([np.repeat([0, 1, 2], 40), [3, 3]])  # class 3: 2 rows vs a median of 40; 4 and 5: none
    src = _labelled_parquet(tmp_path, labels)
    assert (
        main(["data", "prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--classes", "a,b,c,d,e,f"]) == 0
    )
    out = capsys.readouterr().out
    warnings = load_meta(tmp_path / "o")["warnings"]
    assert warnings == [
        "class 'e' has no rows in parquet:" + str(src),
        "class 'f' has no rows in parquet:" + str(src),
        "class 'd' has 2 rows, the median class 40",
    ]
    assert all(f"effray: warning: {w}" in out for w in warnings)


def test_the_real_cifar_file_prepares_without_a_label_warning(tiny_cifar):
    """Real CIFAR-10 rows: every label agrees with the class its path names, no class is small."""
    assert load_meta(tiny_cifar)["warnings"] == []
