"""CIFAR-10-C-style corruptions on real CIFAR images: identity at severity 0, seeded per
row (the same whatever the batching), severity monotone in what each one changes, and
the published ones we re-implement matched against their reference library where it is
installed (PIL's BOX resize for pixelate)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from effray.data.augment_image import rgb_to_hsv
from effray.data.corrupt import CORRUPTIONS, corrupt, corrupt_batch, disk_kernel, parse_corruptions
from effray.errors import EffrayError
from effray.models import build_model
from effray.train import validate
from effray.train.validate import CorruptionScore, batches_accuracy, corrupted_batches

NOISY = ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.fixture(scope="module")
def images(cifar_parquet) -> np.ndarray:
    table = pq.read_table(cifar_parquet).slice(0, 48)
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])


def test_the_issue_s_corruptions_are_all_there():
    assert set(NOISY) | {
        "gaussian_blur",
        "defocus_blur",
        "contrast",
        "brightness",
        "saturate",
        "pixelate",
        "jpeg_compression",
    } <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_zero_is_the_identity_and_every_severity_keeps_the_format(images, name):
    assert np.array_equal(corrupt(images, name, 0), images)
    for s in range(1, 6):
        out = corrupt(images, name, s, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images), (name, s)


@pytest.mark.parametrize("name", NOISY)
def test_noise_is_seeded_per_row_whatever_the_batching(images, name):
    rows = np.arange(100, 100 + len(images))
    whole = corrupt(images, name, 3, seed=7, rows=rows)
    split = np.concatenate(
        [corrupt(images[:17], name, 3, seed=7, rows=rows[:17]), corrupt(images[17:], name, 3, seed=7, rows=rows[17:])]
    )
    assert np.array_equal(whole, split)
    assert not np.array_equal(whole, corrupt(images, name, 3, seed=8, rows=rows))
    batch = corrupt_batch({"image": images, "label": np.zeros(len(images)), "index": rows}, name, 3, seed=7)
    assert np.array_equal(batch["image"], whole) and set(batch) == {"image", "label", "index"}


def _gradient_energy(x: np.ndarray) -> float:
    f = x.astype(np.float64)
    return float(np.abs(np.diff(f, axis=1)).mean() + np.abs(np.diff(f, axis=2)).mean())


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def _hsv(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rgb_to_hsv(torch.from_numpy(x / 255.0))


STATISTIC = {  # a measured statistic each corruption's severity must move in one direction
    "gaussian_noise": (_distance, +1),
    "shot_noise": (_distance, +1),
    "impulse_noise": (_distance, +1),
    "gaussian_blur": (lambda x, clean: _gradient_energy(x), -1),
    "defocus_blur": (lambda x, clean: _gradient_energy(x), -1),
    "contrast": (lambda x, clean: float(x.astype(np.float64).std(axis=(1, 2)).mean()), -1),
    "brightness": (lambda x, clean: float(_hsv(x)[2].mean()), +1),
    "pixelate": (_distance, +1),
    "jpeg_compression": (_distance, +1),
}


@pytest.mark.parametrize("name", list(STATISTIC))
def test_severity_is_monotone_in_what_the_corruption_changes(images, name):
    stat, sign = STATISTIC[name]
    values = [stat(corrupt(images, name, s, seed=0), images) for s in range(0, 6)]
    assert all(sign * (b - a) > 0 for a, b in zip(values, values[1:])), values


def test_saturate_follows_the_published_parameters_which_are_not_monotone(images):
    sat = [float(_hsv(corrupt(images, "saturate", s))[1].mean()) for s in range(0, 6)]
    assert sat[2] < sat[1] < sat[0] < sat[3] < sat[4] < sat[5]  # x0.3, x0.1, then x1.5, x2 + .1, x2.5 + .2


def test_pixelate_matches_pil_box_resizes_within_one_level(images):
    for s, c in enumerate([0.95, 0.9, 0.85, 0.75, 0.65], start=1):
        small = int(32 * c)
        ref = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((small, small), Image.BOX).resize((32, 32), Image.BOX))
                for im in images
            ]
        )
        assert np.abs(corrupt(images, "pixelate", s).astype(int) - ref).max() <= 1


def test_blurs_keep_flat_images_flat_and_their_kernels_sum_to_one():
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    for name in ("gaussian_blur", "defocus_blur"):
        for s in range(1, 6):
            assert np.array_equal(corrupt(flat, name, s), flat)
    for radius, alias in [(0.3, 0.4), (1, 0.2), (1.5, 0.1)]:
        k = disk_kernel(radius, alias)
        assert k.sum() == pytest.approx(1.0, abs=1e-6) and np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])


def test_jpeg_matches_pil_at_the_published_quality(images):
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "JPEG", quality=40)
    assert np.array_equal(corrupt(images[:1], "jpeg_compression", 5)[0], np.asarray(Image.open(buf)))


def test_bad_names_and_severities_fail_in_one_line(images):
    with pytest.raises(EffrayError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)
    with pytest.raises(EffrayError, match="severity must be 0-5"):
        corrupt(images, "contrast", 6)
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("contrast, pixelate") == ["contrast", "pixelate"]
    with pytest.raises(EffrayError, match="valid: all, "):
        parse_corruptions("contrast,snow")


def test_a_corruption_score_keeps_small_copies_and_makes_large_ones_again_with_the_same_result(monkeypatch):
    """A search scores the same corrupted val images after every epoch: kept in memory when
    they fit, made again on every pass when not, and either way the one-pass score."""
    rng = np.random.default_rng(0)
    val = {
        "image": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 20),
        "index": np.arange(100, 120),
    }
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_classes": 10}
    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, 0.25)
    score = CorruptionScore(("gaussian_noise", "contrast"), (1, 3), images=12, seed=1)
    kept = score.copies(val)
    assert isinstance(kept, list) and len(kept) == 4 and all(len(x) == len(y) == 12 for x, y in kept)
    once = batches_accuracy(
        model, corrupted_batches(val, ["gaussian_noise", "contrast"], [1, 3], seed=1, images=12), meta
    )
    assert batches_accuracy(model, kept, meta) == once == score.score(model, val, meta)
    monkeypatch.setattr(validate, "KEPT_BYTES", 0)
    remade = score.copies(val)
    assert not isinstance(remade, list)
    assert batches_accuracy(model, remade, meta) == once == batches_accuracy(model, remade, meta)  # every pass
    nothing = {k: v[:0] for k, v in val.items()}
    assert np.isnan(CorruptionScore(("contrast",), (1,), images=0, seed=1).score(model, nothing, meta))
