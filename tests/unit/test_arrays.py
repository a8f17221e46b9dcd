"""A search's shared arrays: the split decoded as the pipeline decodes it, and epochs that
are reproducible, fresh every epoch, and cover every row once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from effray.data.arrays import epoch_batches, eval_batches, load_arrays
from effray.data.images import normalize_tensor
from effray.errors import EffrayError

META = {"num_classes": 10, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """The reference: uint8 NHWC -> float32 (x/255 - mean)/std, NCHW."""
    x = (images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _arrays(n: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int64),
        "index": np.arange(n, dtype=np.int64) * 3,
    }


def test_epochs_are_seeded_fresh_and_cover_every_row_once():
    arrays = _arrays()

    def epoch(e: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(epoch_batches(arrays, META, 16, policy="crop(4)|flip", seed=seed, epoch=e, device="cpu"))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert [len(y) for _, y in a] == [16, 16, 16, 2]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))  # a new order
    assert not torch.equal(a[0][0], epoch(0, seed=1)[0][0])
    assert sorted(torch.cat([y for _, y in c]).tolist()) == sorted(arrays["label"].tolist())
    # no augmentation: exactly the normalised rows, in the epoch's order
    plain = list(epoch_batches(arrays, META, 64, policy="none", seed=0, epoch=0, device="cpu"))[0][0]
    order = np.random.default_rng(np.random.SeedSequence([0, 0, 0x5EED])).permutation(50)
    want = normalize(arrays["image"][order], META["mean"], META["std"])
    assert torch.allclose(plain, torch.from_numpy(want), atol=1e-5)


def test_load_arrays_reads_a_prepared_split_in_file_order(tmp_path):
    import json

    from effray.data.prepare import FORMAT_VERSION

    arrays = _arrays(30)
    (tmp_path / "train").mkdir()
    for i, rows in enumerate((slice(0, 20), slice(20, 30))):
        pq.write_table(
            pa.table(
                {
                    "image": [x.tobytes() for x in arrays["image"][rows]],
                    "label": arrays["label"][rows],
                    "index": arrays["index"][rows],
                    "synthetic": [False] * len(arrays["label"][rows]),
                }
            ),
            tmp_path / "train" / f"part-{i:05d}.parquet",
        )
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {"format_version": FORMAT_VERSION, "splits": ["train"], "image_shape": [32, 32, 3], "counts": {"train": 30}}
        )
    )
    got = load_arrays(tmp_path, "train")
    assert all(np.array_equal(got[k], arrays[k]) for k in ("image", "label", "index"))
    first = load_arrays(tmp_path, "train", limit=25)
    assert len(first["label"]) == 25 and np.array_equal(first["image"], arrays["image"][:25])
    batches = eval_batches(got, META, 16)
    assert [len(y) for _, y in batches] == [16, 14]
    assert torch.allclose(
        batches[0][0], torch.from_numpy(normalize(arrays["image"][:16], META["mean"], META["std"])), atol=1e-5
    )


def test_normalize_tensor_is_x_over_255_minus_mean_over_std_in_nchw():
    x = _arrays(2)["image"][:, :12, :12]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = normalize_tensor(torch.from_numpy(x.copy()), mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 12, 12) and out.is_contiguous()
    np.testing.assert_allclose(out[:, 1].numpy(), (x[..., 1] / 255 - 0.4) / 0.25, rtol=1e-5, atol=1e-5)
    last = normalize_tensor(torch.from_numpy(x.copy()), mean, std, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
    assert normalize_tensor(torch.from_numpy(x[..., :1].copy()), 0.5, 0.25).shape == (2, 1, 12, 12)
    with pytest.raises(EffrayError, match="mean has 2 values for 3-channel images"):
        normalize_tensor(torch.from_numpy(x.copy()), [0.5, 0.5], [0.2, 0.2])
    with pytest.raises(EffrayError, match="std must be > 0"):
        normalize_tensor(torch.from_numpy(x.copy()), mean, [0.2, 0.0, 0.3])
