"""`effray compress` on local Ray: bad input refused in one line before anything is written.
The Ray Train fine-tune itself (2 workers on 2 nodes, a worker death, the metrics file
against the artifact) is tests/multinode/test_multinode.py's compress test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import save_checkpoint

from effray.cli import main
from effray.data.prepare import load_meta
from effray.models import build_model
from effray.train.checkpoint import data_summary


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def five_class_teacher(tiny_cifar, tmp_path_factory) -> Path:
    meta = load_meta(tiny_cifar)
    model = build_model("convnet", 5, 3, 0.25)
    out = tmp_path_factory.mktemp("teacher5")
    save_checkpoint(out, model, data=data_summary(meta), epoch=0)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "prune-rate",
        "bits",
        "temperature",
        "teacher",
        "classes",
        "existing-out",
        "layer-bits",
        "sensitivity",
        "kd-features",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    ray_session, tiny_cifar, teacher, five_class_teacher, tmp_path, capsys, case
):
    out = tmp_path / "out"
    extra: list[str] = []
    ckpt = str(teacher)
    if case == "prune-rate":
        extra = ["--prune-rate", "1.0"]
    elif case == "bits":
        extra = ["--bits", "9"]
    elif case == "temperature":
        extra = ["--kd-alpha", "0.5", "--kd-temperature", "0"]
    elif case == "teacher":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        ckpt = str(bad)
    elif case == "classes":
        ckpt = str(five_class_teacher)
        extra = ["--student", "convnet"]
    elif case == "layer-bits":  # a layer the teacher lacks
        extra = ["--bits", "4", "--layer-bits", "no.such.layer=4"]
    elif case == "sensitivity":  # no table where --sensitivity points
        extra = ["--bits", "4", "--allocation", "sensitivity", "--sensitivity", str(tmp_path)]
    elif case == "kd-features":  # a module the teacher lacks
        extra = ["--kd-features", "block1=no.such.module"]
    elif case == "existing-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(
        [
            "compress",
            "--teacher",
            ckpt,
            "--data",
            str(tiny_cifar),
            "--out",
            str(out),
            "--workers",
            "2",
            "--cpus-per-worker",
            "0.5",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("effray: error:"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if case == "existing-out":
        assert (out / "keep.txt").read_text() == "mine"
