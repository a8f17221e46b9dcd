"""`effray predict` on local Ray and tiny real data: Ray Data's predictions (the model in an
actor pool) equal the same model run in-process, row by row, whatever batches Ray Data
made; unusable images are skipped rows with their reason, never a failed run; images of
another size are resized by the model's preprocessing and say so; bad flags fail in one
line and write nothing."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli
from PIL import Image

from effray.data.arrays import load_arrays
from effray.data.augment import preprocess_image
from effray.data.prepare import load_meta
from effray.deploy.model import load_deployable, softmax


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def in_process(teacher, images: np.ndarray) -> np.ndarray:
    return load_deployable(teacher, device="cpu").logits(images)


def test_predictions_of_a_prepared_split_equal_the_model_in_process(ray_session, tiny_cifar, teacher, tmp_path):
    out = tmp_path / "pred"
    rc, res, err = cli(
        "predict",
        "--model",
        str(teacher),
        "--data",
        str(tiny_cifar),
        "--split",
        "val",
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--top-k",
        "3",
    )
    assert rc == 0, err
    assert (res["rows"], res["predicted"], res["skipped"], res["data_kind"]) == (60, 60, 0, "prepared")
    assert res["images_per_s"] > 0 and res["model"]["kind"] == "checkpoint"
    table = pq.read_table(out / "predictions.parquet").to_pydict()
    order = np.argsort(table["index"])
    val = load_arrays(tiny_cifar, "val")
    assert np.array_equal(np.asarray(table["index"])[order], val["index"])
    logits = in_process(teacher, val["image"])
    want = logits.argmax(axis=1)
    assert np.array_equal(np.asarray(table["predicted"])[order], want)
    assert np.array_equal(np.asarray(table["label"])[order], val["label"])
    classes = load_meta(tiny_cifar)["classes"]
    assert [table["class_name"][i] for i in order] == [classes[k] for k in want]
    probs = softmax(logits)
    np.testing.assert_allclose(np.asarray(table["probability"])[order], probs.max(axis=1), atol=1e-5)
    top = np.asarray(table["top_k_labels"])[order]
    assert top.shape == (60, 3) and np.array_equal(top, np.argsort(-logits, axis=1, kind="stable")[:, :3])
    top_p = np.asarray(table["top_k_probabilities"])[order]
    assert np.all(np.diff(top_p, axis=1) <= 0)
    assert res["accuracy"] == pytest.approx(float((want == val["label"]).mean()))
    assert res["accuracy"] > 0.2  # the teacher beats chance (0.1), so the labels line up with its classes
    assert pq.read_table(out / "skipped.parquet").num_rows == 0 and (out / "predict.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # the temp directory was renamed, nothing left beside


def test_a_folder_of_pngs_skips_the_corrupt_image_resizes_the_small_one_and_predicts_the_rest(
    ray_session, tiny_cifar, teacher, tmp_path
):
    images = load_arrays(tiny_cifar, "val", limit=12)["image"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        (folder / f"img_{i:02d}.png").write_bytes(png(img))
    (folder / "broken.png").write_bytes(png(images[0])[:60])  # a PNG cut off mid-stream
    (folder / "small.png").write_bytes(png(images[0][:16, :16]))
    (folder / "notes.txt").write_text("not an image file: not listed")
    rc, res, err = cli(
        "predict", "--model", str(teacher), "--data", str(folder), "--out", str(tmp_path / "pred"), "--batch-size", "5"
    )
    assert rc == 0, err
    assert (res["rows"], res["predicted"], res["skipped"], res["resized"], res["data_kind"]) == (14, 13, 1, 1, "images")
    assert "accuracy" not in res  # no labels in a plain folder
    skipped = dict(
        zip(*pq.read_table(tmp_path / "pred" / "skipped.parquet", columns=["name", "reason"]).to_pydict().values())
    )
    assert set(skipped) == {"broken.png"} and skipped["broken.png"].startswith("corrupt image")
    table = pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pydict()
    by_name = dict(zip(table["name"], table["predicted"]))
    # PNG is lossless: the same pixels; the 16x16 one as the model's preprocessing makes it 32x32
    small = preprocess_image(images[0][:16, :16], load_deployable(teacher, device="cpu").info.resize)
    want = in_process(teacher, np.concatenate([images, small[None]])).argmax(axis=1)
    assert by_name == {**{f"img_{i:02d}.png": int(want[i]) for i in range(12)}, "small.png": int(want[12])}
    assert dict(zip(table["name"], table["resized_from"])) == {
        **{f"img_{i:02d}.png": None for i in range(12)},
        "small.png": "16x16",
    }
    assert table["label"] == [None] * 13


def test_a_parquet_source_with_encoded_images_reports_accuracy_and_skips_a_bad_row(
    ray_session, tiny_cifar, teacher, tmp_path
):
    val = load_arrays(tiny_cifar, "val", limit=20)
    encoded = [png(img) for img in val["image"]] + [b"\x89PNG\r\n\x1a\n garbage"]
    labels = val["label"].tolist() + [3]
    pq.write_table(pa.table({"image": encoded, "label": labels}), tmp_path / "src.parquet")
    rc, res, err = cli(
        "predict",
        "--model",
        str(teacher),
        "--data",
        f"parquet:{tmp_path / 'src.parquet'}",
        "--out",
        str(tmp_path / "pred"),
    )
    assert rc == 0, err
    assert (res["predicted"], res["skipped"], res["data_kind"]) == (20, 1, "source")
    assert res["skipped_examples"][0].startswith("src.parquet#row20: corrupt image")
    want = in_process(teacher, val["image"]).argmax(axis=1)
    table = pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pydict()
    got = dict(zip(table["index"], table["predicted"]))
    assert got == {i: int(want[i]) for i in range(20)} and dict(zip(table["index"], table["label"])) == dict(
        enumerate(labels[:20])
    )
    assert res["accuracy"] == pytest.approx(float((want == val["label"]).mean()))


def test_bad_flags_fail_in_one_line_and_write_nothing(ray_session, tiny_cifar, teacher, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    base = ["predict", "--model", str(teacher), "--data", str(tiny_cifar)]
    for extra, message in [
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--top-k", "11"], "--top-k 11 is more than the model's 10 classes"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["--split", "test"], "has no 'test' split"),
        (["--gpus-per-actor", "1"], "--gpus-per-actor 1 but the cluster has 0 GPUs"),
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--data", str(tmp_path / "nope")], "does not exist"),
        (["--out", str(taken)], "already exists; pass --overwrite"),
    ]:
        out = [] if "--out" in extra else ["--out", str(tmp_path / "x")]
        rc, res, err = cli(*base, *out, *extra)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert res is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and not any(taken.iterdir()), extra
