"""`effray evaluate` beyond accuracy on local Ray and tiny real data: corruption
robustness streamed through Ray Data equals the same corruptions applied in-process, row
by row (so it is deterministic, whatever batches Ray Data made), and bad corruption
flags fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import cli

from effray.data.arrays import load_arrays
from effray.data.corrupt import corrupt
from effray.data.prepare import load_meta
from effray.evaluate import score
from effray.train.checkpoint import load_checkpoint


def test_corruption_accuracy_on_ray_data_matches_the_corruptions_in_process(ray_session, tiny_cifar, teacher, tmp_path):
    args = [
        "evaluate",
        "--checkpoint",
        str(teacher),
        "--data",
        str(tiny_cifar),
        "--corruptions",
        "gaussian_noise,contrast",
        "--severities",
        "1,5",
        "--corruption-seed",
        "3",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path / "eval"),
    ]
    rc, res, err = cli(*args)
    assert rc == 0, err
    rob = res["robustness"]
    assert (
        rob["images"] == 60
        and rob["severities"] == [1, 5]
        and set(rob["corruption_accuracy"]) == {"gaussian_noise", "contrast"}
    )
    table = [a for per in rob["corruption_accuracy"].values() for a in per.values()]
    assert res["mean_corruption_accuracy"] == pytest.approx(np.mean(table))
    assert rob["clean_accuracy"] == res["accuracy"]
    assert rob["relative_drop"] == pytest.approx((res["accuracy"] - np.mean(table)) / res["accuracy"])
    # the same split corrupted here, row by row, and scored by the in-process path
    model, payload = load_checkpoint(teacher)
    meta, val = load_meta(tiny_cifar), load_arrays(tiny_cifar, "val")
    for name in ("gaussian_noise", "contrast"):
        for s in (1, 5):
            images = corrupt(val["image"], name, s, seed=3, rows=val["index"])
            want = score(
                model, [(images, val["label"])], meta["mean"], meta["std"], 10, 32, numerics=payload.get("numerics")
            )
            assert rob["corruption_accuracy"][name][str(s)] == pytest.approx(want["accuracy"], abs=1e-9), (name, s)


def test_bad_corruption_flags_fail_in_one_line(tiny_cifar, teacher, cifar_parquet, tmp_path):
    for extra, message in [
        (["--corruptions", "fog"], "unknown corruption 'fog'"),
        (["--corruptions", "contrast", "--severities", "0,6"], "--severities must be"),
        (["--corruptions", "all", "--data", str(cifar_parquet)], "needs a prepared dataset"),
    ]:
        args = [
            "evaluate",
            "--checkpoint",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--out",
            str(tmp_path / "x"),
            *extra,
        ]
        rc, res, err = cli(*args)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
