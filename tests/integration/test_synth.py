"""`effray synth train|sample|score` end to end on 600 real CIFAR-10 images: the GAN
trains on Ray Train and resumes, sampling writes a canonical dataset the pipeline mixes
in at the requested ratio, and bad input is one line."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from effray.cli import main
from effray.data.pipeline import DataConfig, train_dataset
from effray.data.prepare import load_meta, split_files

GAN_FLAGS = [
    "--gen-width",
    "8",
    "--disc-width",
    "8",
    "--z-dim",
    "16",
    "--batch-size",
    "32",
    "--limit",
    "96",
    # two DDP workers (gloo), so both networks' gradient all-reduce runs
    "--workers",
    "2",
    "--cpus-per-worker",
    "0.5",
]


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gan(tiny_cifar, tmp_path_factory):
    """One epoch on 2 workers, then the same command again: the second run resumes from the checkpoint."""
    out = tmp_path_factory.mktemp("gan") / "out"
    runs = []
    for _ in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(
                [
                    "synth",
                    "train",
                    "--data",
                    str(tiny_cifar),
                    "--out",
                    str(out),
                    "--epochs",
                    "1",
                    *GAN_FLAGS,
                ]
            )
        assert rc == 0
        runs.append(json.loads(buf.getvalue().strip().splitlines()[-1]))
    return out, runs


@pytest.mark.slow
def test_gan_trains_on_ray_train_and_resumes(gan):
    from effray.synth.train import GENERATOR_FORMAT, load_generator

    out, (first, second) = gan
    assert first["epochs"] == 1 and first["epochs_run_now"] == 1
    assert second["epochs"] == 1 and second["epochs_run_now"] == 0  # restored, nothing left to run
    history = [json.loads(line) for line in (out / "gan" / "history.jsonl").read_text().splitlines()]
    # no epoch ran twice; 96 rows / batch 32 = 3 steps
    assert [h["epoch"] for h in history] == [1] and history[0]["steps"] == 3
    # the generator was re-exported from the restored checkpoint
    assert second["d_loss"] == first["d_loss"]
    g, payload = load_generator(out / "generator.pt")
    assert payload["format"] == GENERATOR_FORMAT and payload["num_classes"] == 10 and payload["z_dim"] == 16
    assert (
        payload["classes"][0] == "airplane"
        and payload["data"]["checksum"] == load_meta(payload["config"]["data"])["source_checksum"]
    )
    assert len(payload["history"]) == 1 and g.spec["width"] == 8


@pytest.fixture(scope="module")
def sampled(gan, teacher, tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "syn"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "synth",
                "sample",
                "--generator",
                str(gan[0] / "generator.pt"),
                "--per-class",
                "30",
                "--out",
                str(out),
                "--batch-size",
                "64",
                "--classifier",
                str(teacher),
                "--grid-columns",
                "4",
            ]
        )
    assert rc == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_sample_writes_a_canonical_synthetic_dataset(sampled, tiny_cifar):
    out, result = sampled
    meta, real = load_meta(out), load_meta(tiny_cifar)
    assert result["rows"] == 300 and meta["counts"] == {"train": 300} and meta["splits"] == ["train"]
    assert meta["counts_per_class"]["train"] == [30] * 10
    assert meta["classes"] == real["classes"] and meta["image_shape"] == real["image_shape"]
    table = pq.read_table(split_files(out, "train"))
    assert table.num_rows == 300 and all(table.column("synthetic").to_pylist())
    labels = np.array(table.column("label").to_pylist())
    assert np.bincount(labels, minlength=10).tolist() == [30] * 10
    assert sorted(table.column("index").to_pylist()) == list(range(300))
    assert {len(b) for b in table.column("image").to_pylist()} == {32 * 32 * 3}
    assert labels[:20].tolist() == list(range(10)) * 2  # interleaved: any prefix is class-balanced
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (10 * 34, 4 * 34, 3)  # one row per class
    q = json.loads((out / "quality.json").read_text())
    assert q == result["quality"] and q["rows"] == 60  # capped by the 60-image val split
    assert 0.0 <= q["class_consistency"] <= 1.0 and q["classifier_real_accuracy"] > 0.2
    assert q["fid_style"] > 0 and np.isfinite(q["diversity_ratio"]) and q["feature_dim"] == 64


@pytest.mark.slow
def test_pipeline_mixes_sampled_rows_at_the_ratio(sampled, tiny_cifar):
    out, _ = sampled
    cfg = DataConfig(data=str(tiny_cifar), augment="flip", synthetic=str(out), synthetic_ratio=0.25)
    syn, labels, n = 0, [], 0
    for b in train_dataset(cfg, clock="").iter_batches(batch_size=256, batch_format="numpy"):
        syn += int(b["synthetic"].sum())
        labels += b["label"][b["synthetic"]].tolist()
        n += len(b["label"])
    assert syn == round(0.25 / 0.75 * 540) == 180 and n == 540 + 180  # 25% of the stream
    # near-balanced across classes: the sample interleaves classes, and the pipeline's limit takes whole blocks
    assert np.abs(np.bincount(labels, minlength=10) - 18).max() <= 2


@pytest.mark.slow
def test_score_command(sampled, teacher, tiny_cifar, capsys):
    out, result = sampled
    argv = [
        "synth",
        "score",
        "--synthetic",
        str(out),
        "--classifier",
        str(teacher),
        "--real",
        str(tiny_cifar),
    ]
    assert main(argv) == 0
    got = _json(capsys)
    assert got["fid_style"] == pytest.approx(result["quality"]["fid_style"])


def test_bad_input_is_one_line(tiny_cifar, teacher, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [
        (
            ["synth", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")],
            "not a prepared dataset",
            "o1",
        ),
        (
            ["synth", "sample", "--generator", str(garbage), "--per-class", "0", "--out", str(tmp_path / "o2")],
            "--per-class must be >= 1",
            "o2",
        ),
        (["synth", "sample", "--generator", str(garbage), "--out", str(tmp_path / "o3")], "garbage.pt", "o3"),
        (["synth", "sample", "--generator", str(teacher), "--out", str(tmp_path / "o4")], "not a generator", "o4"),
        (["synth", "sample", "--generator", str(garbage), "--out", str(exists)], "already exists", None),
    ]
    for argv, message, out in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("effray: error:") and message in err[0], err
        if out:
            assert not (tmp_path / out).exists()
    # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "garbage.pt"]
